"""singleton: run each firing of a scheduled job once across every replica of a service.

The public API: the :func:`job` decorator, the :class:`JobContext` a job receives, and the
errors. See ``docs/architecture.md`` for how a firing flows through the modules.
"""

from __future__ import annotations

from singleton.context import JobContext
from singleton.errors import (
    AlreadyApplied,
    BackendError,
    BackendUnavailable,
    ConfigError,
    LeaseLost,
    SingletonError,
    StaleToken,
    TokenRegression,
)
from singleton.job import job

__all__ = [
    "AlreadyApplied",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "JobContext",
    "LeaseLost",
    "SingletonError",
    "StaleToken",
    "TokenRegression",
    "job",
]
