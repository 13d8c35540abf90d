"""Errors a user or a coordinator can cause.

Contention is never an exception (a busy lock is ``None``, a done firing is a ``Claim``);
exceptions are for faults. Every one of them derives from :class:`SingletonError`, so a
caller can catch ours without catching its own bugs.
"""

from __future__ import annotations


class SingletonError(Exception):
    """Root of every error singleton raises on purpose."""


class ConfigError(SingletonError):
    """The configuration, a job definition or a CLI argument is wrong (exit 78)."""


class BackendError(SingletonError):
    """The coordinator answered in a way we cannot use."""


class BackendUnavailable(BackendError):
    """The coordinator could not be reached; the only kind of error worth retrying (exit 69)."""


class LockBusy(SingletonError):
    """``singleton.lock`` waited as long as it was allowed and the lock stayed taken."""


class LeaseLost(SingletonError):
    """The lease ended before its holder let go: expired, stolen, or its renewal failed."""


class StaleToken(SingletonError):
    """A fenced write carried a token lower than one the resource has already accepted."""


class AlreadyApplied(SingletonError):
    """A fenced write for a run ID that the resource has already applied."""


class TokenRegression(BackendError):
    """The coordinator issued a token no higher than one seen before: it lost data."""
