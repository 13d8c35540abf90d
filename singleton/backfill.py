"""``singleton backfill``: run the past firings of a range that the ledger does not show as
succeeded, one at a time, under the job's lock.

Each firing runs under its own scheduled run ID, so a backfill is safe to interrupt and run
again (what succeeded is not run twice) and safe beside running replicas (the lock and the
ledger make the scheduled firing and the backfilled one the same firing). The range must lie
within the ledger's retention: older firings may have run and been forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from singleton.backends.base import SUCCEEDED, Attempt, Ledger
from singleton.firing import Firer
from singleton.jobs import MAX_CATCHUP, Job
from singleton.schedule import fires_between, run_id

#: ``fires_between`` takes an exclusive start; a range starts at its first instant.
_JUST_BEFORE = timedelta(microseconds=1)


@dataclass(frozen=True)
class Firing:
    """One firing of the range: what the ledger said before, and after the backfill."""

    scheduled_at: datetime
    run_id: str
    before: Attempt | None
    after: Attempt | None = None

    @property
    def done(self) -> bool:
        """Already succeeded before the backfill: left alone."""
        return self.before is not None and self.before.state == SUCCEEDED

    @property
    def succeeded(self) -> bool:
        return self.after is not None and self.after.state == SUCCEEDED


def describe(row: Attempt | None) -> str:
    """``succeeded``, ``skipped (misfired)``, ``-`` for a firing the ledger never saw."""
    if row is None:
        return "-"
    return row.state + (f" ({row.reason})" if row.reason else "")


def plan(ledger: Ledger, job: Job, start: datetime, end: datetime) -> list[Firing]:
    """Every firing of ``job`` in ``[start, end]`` with its latest attempt; ConfigError when
    the range holds more than :data:`~singleton.jobs.MAX_CATCHUP` firings."""
    found = []
    for when in fires_between(job.schedule, start - _JUST_BEFORE, end, MAX_CATCHUP):
        rid = run_id(job.name, when)
        rows = ledger.attempts(rid)
        found.append(Firing(when, rid, rows[0] if rows else None))
    return found


def run_one(firer: Firer, job: Job, firing: Firing) -> Firing:
    """Run one firing of the plan (it waits for the lock up to the job's ``misfire_grace``);
    the firing with what the ledger says after."""
    firer.backfill(job, firing.scheduled_at)
    rows = firer.backend.attempts(firing.run_id)
    return Firing(firing.scheduled_at, firing.run_id, firing.before, rows[0] if rows else None)
