"""singleton: run each firing of a scheduled job once across every replica of a service.

The public API: the :func:`job` decorator, the :class:`JobContext` a job receives, and the
errors. See ``docs/architecture.md`` for how a firing flows through the modules.

``job`` is imported on first use: a job command that only needs ``singleton.fencing`` should
not pay for pydantic and the config machinery at every start.
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
    SingletonError,
    StaleToken,
    TokenRegression,
)

if TYPE_CHECKING:
    from singleton.jobs import job

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


def __getattr__(name: str) -> Any:
    if name == "job":
        from singleton.jobs import job

        return job
    raise AttributeError(f"module 'singleton' has no attribute {name!r}")
