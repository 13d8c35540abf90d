"""singleton: run each firing of a scheduled job once across every replica of a service.

The public API: the :func:`job` decorator and the :class:`JobContext` a job receives; the
coordination API :func:`lock` and :func:`leader` for the user's own code; the errors. See
``docs/architecture.md`` for how a firing flows through the modules.

``job``, ``lock`` and ``leader`` are imported on first use: a job command that only needs
``singleton.fencing`` should not pay for pydantic and the config machinery at every start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from singleton.context import JobContext
from singleton.errors import (
    AlreadyApplied,
    BackendError,
    BackendUnavailable,
    ConfigError,
    LeaseLost,
    LockBusy,
    SingletonError,
    StaleToken,
    TokenRegression,
)

if TYPE_CHECKING:
    from singleton.jobs import job
    from singleton.leadership import leader
    from singleton.locking import lock

__all__ = [
    "AlreadyApplied",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "JobContext",
    "LeaseLost",
    "LockBusy",
    "SingletonError",
    "StaleToken",
    "TokenRegression",
    "job",
    "leader",
    "lock",
]

_LAZY = {"job": "singleton.jobs", "lock": "singleton.locking", "leader": "singleton.leadership"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'singleton' has no attribute {name!r}")
