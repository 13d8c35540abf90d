"""State changes of firings and leases, fanned out to listeners (logs now; metrics, Sentry).

Side channels must never break the lock path: a listener that raises is logged and
ignored, so a full disk or a down Sentry cannot keep a lease from being released.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("singleton.events")

#: Event kinds too frequent for the info log (a renewal every ttl/3 of every held lease).
QUIET = frozenset({"renewed", "clock", "fleet", "pauses"})
#: Event kinds that mean something went wrong, logged at warning or error.
WARNINGS = frozenset(
    {
        "renewal_failed",
        "lost",
        "failed",
        "timed_out",
        "lost_lease",
        "finish_refused",
        "fleet_disagreement",
    }
)
ERRORS = frozenset({"token_regression", "backend_error", "clock_skew"})


@dataclass(frozen=True)
class Event:
    """One state change: ``kind`` (acquired, skipped, claimed, started, succeeded, …)."""

    kind: str
    job: str
    replica: str
    run_id: str | None = None
    token: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    #: The exception a job raised, for error reporting; the log already has its traceback.
    exc: BaseException | None = None


Listener = Callable[[Event], None]


class Events:
    """Calls every listener for every event, safely."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self._listeners: list[Listener] = []

    def add(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(
        self,
        kind: str,
        job: str,
        run_id: str | None = None,
        token: int | None = None,
        *,
        exc: BaseException | None = None,
        **fields: Any,
    ) -> None:
        event = Event(kind, job, self.replica, run_id, token, fields, exc)
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r failed on %s", listener, kind)


def log_event(event: Event) -> None:
    """The structured log line of one state change."""
    level = logging.INFO
    if event.kind in ERRORS:
        level = logging.ERROR
    elif event.kind in WARNINGS:
        level = logging.WARNING
    elif event.kind in QUIET:
        level = logging.DEBUG
    extra: dict[str, Any] = {"event": event.kind, "job": event.job, "replica": event.replica}
    if event.run_id is not None:
        extra["run_id"] = event.run_id
    if event.token is not None:
        extra["token"] = event.token
    extra.update(event.fields)
    logging.getLogger("singleton.runner").log(level, event.kind, extra={"fields": extra})
