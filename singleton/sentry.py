"""Sentry: job errors with their firing as tags, and Crons check-ins sent by the owner only.

Why the check-in ID is ``uuid5(run ID)``: every replica names a firing the same way, so the
owner's ``in_progress`` and the final ``ok``/``error`` pair up even when a takeover moves the
firing to another replica mid-run, and one firing is one check-in whatever the replica
count. Only the owner sends them (standbys see no ``started`` event).

Sentry's monitor schedules have minute resolution: a schedule that a five-field crontab
cannot say (``every: 10s``) sends its check-ins without a monitor schedule.

A listener like the log and the metrics: it never blocks or breaks the lock path (the SDK
sends from its own thread, and the events fan-out catches anything it raises).
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

from singleton.config import SentryConfig
from singleton.errors import ConfigError
from singleton.events import Event
from singleton.jobs import Job

if TYPE_CHECKING:
    from sentry_sdk.types import MonitorConfig

#: Namespace of check-in IDs: uuid5(NAMESPACE, run ID).
NAMESPACE = uuid.UUID("5b0b8a7e-3c1e-4f6a-9d51-6a1e0c2f9b47")
_FINAL = {"succeeded": "ok", "failed": "error", "timed_out": "error", "lost_lease": "error"}


def check_in_id(run_id: str) -> str:
    return uuid.uuid5(NAMESPACE, run_id).hex


def monitor_config(job: Job) -> MonitorConfig | None:
    """The monitor's schedule and margins, or None where minute resolution cannot say it."""
    crontab = job.schedule.crontab()
    if crontab is None:
        return None
    expr, timezone = crontab
    config: MonitorConfig = {
        "schedule": {"type": "crontab", "value": expr},
        "timezone": timezone,
        "checkin_margin": max(1, int(job.misfire_grace // 60)),
    }
    if job.timeout is not None:
        config["max_runtime"] = max(1, int(job.timeout // 60) + 1)
    return config


class SentryReporter:
    """An events listener sending errors and check-ins through an initialised SDK."""

    def __init__(self, jobs: dict[str, Job], crons: bool) -> None:
        import sentry_sdk

        self._sdk = sentry_sdk
        self._jobs = jobs
        self._crons = crons

    def flush(self) -> None:
        """Send what is queued before the process exits (there is no atexit hook)."""
        self._sdk.flush(timeout=5)

    def __call__(self, event: Event) -> None:
        job = self._jobs.get(event.job)
        if job is None or event.run_id is None:
            return
        if self._crons and event.kind == "started":
            self._check_in(job, event, "in_progress")
        elif event.kind in _FINAL:
            if self._crons:
                self._check_in(job, event, _FINAL[event.kind])
            if event.kind != "succeeded":
                self._report(event)

    def _check_in(self, job: Job, event: Event, status: str) -> None:
        from sentry_sdk.crons import capture_checkin

        capture_checkin(
            monitor_slug=job.name,
            check_in_id=check_in_id(str(event.run_id)),
            status=status,
            duration=event.fields.get("duration"),
            monitor_config=monitor_config(job),
        )

    def _report(self, event: Event) -> None:
        with self._sdk.new_scope() as scope:
            scope.set_tag("job", event.job)
            scope.set_tag("run_id", event.run_id)
            scope.set_tag("token", str(event.token))
            scope.set_tag("replica", event.replica)
            scope.set_tag("outcome", event.kind)
            if event.exc is not None:
                self._sdk.capture_exception(event.exc)
            else:
                self._sdk.capture_message(
                    f"{event.job} {event.kind}: {event.fields.get('error')}", level="error"
                )


def setup(config: SentryConfig, jobs: dict[str, Job]) -> SentryReporter | None:
    """Initialise the SDK when a DSN is configured (``sentry.dsn`` or ``SENTRY_DSN``)."""
    dsn = config.dsn or os.environ.get("SENTRY_DSN")
    if not dsn:
        return None
    try:
        import sentry_sdk
    except ImportError:
        raise ConfigError(
            "sentry needs sentry-sdk: pip install 'singleton-runner[sentry]'"
        ) from None
    # No default integrations: errors are reported here, with their firing's tags, not
    # again by a logging hook; and no tracing of a process whose work is other code's.
    sentry_sdk.init(dsn=dsn, environment=config.environment, default_integrations=False)
    return SentryReporter(jobs, config.crons)
