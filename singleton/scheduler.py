"""The timing loop: which job fires next, and when.

Why not APScheduler 3's scheduler: it does not tell a job its scheduled instant (our run ID
is built from it), it cannot take an injected clock, its cron trigger gets crontab's
day-of-week numbering and the DST rule wrong, and it drops misfired firings with a log line
where we must record them. What is left once those parts are replaced is this heap and a
wait, so we keep it small and ours. Schedules themselves are evaluated by ``cronsim``
(:mod:`singleton.schedule`).
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta

from singleton.clock import Clock
from singleton.jobs import Job

log = logging.getLogger("singleton.scheduler")

#: The loop never sleeps longer than this, so a wall-clock step is noticed within a second.
MAX_SLEEP = 1.0
#: After a long stall, at most this many overdue firings per job are handed on (each is
#: recorded as misfired); the rest are skipped over with one log line.
MAX_BACKLOG = 100

Dispatch = Callable[[Job, datetime], None]


class Scheduler:
    """Calls ``dispatch(job, scheduled_at)`` at each job's fire times until ``stop`` is set.

    ``ahead()`` is how many seconds this host's clock runs ahead of the coordinator's (0
    when unknown): each instant waits that much longer, so a host whose clock is fast does
    not start a firing before the fleet's time says so, win it early, and leave the
    replicas that fire on time to find it taken (TESTING.md I9).
    """

    def __init__(
        self,
        jobs: list[Job],
        clock: Clock,
        dispatch: Dispatch,
        ahead: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self._jobs = jobs
        self._clock = clock
        self._dispatch = dispatch
        self._ahead = ahead
        self._heap: list[tuple[datetime, int, Job]] = []

    def next_fire_times(self) -> dict[str, datetime]:
        """The next instant of every scheduled job (for ``/status``)."""
        return {job.name: when for when, _, job in self._heap}

    def run(self, stop: threading.Event, since: datetime | None = None) -> None:
        """Fire every instant strictly after ``since`` (default now) until ``stop``."""
        start = since or self._clock.now()
        for index, job in enumerate(self._jobs):
            self._push(job, index, start)
        while self._heap and not stop.is_set():
            when, index, job = self._heap[0]
            delay = (when - self._clock.now()).total_seconds() + self._ahead()
            if delay > 0:
                self._clock.wait(stop, min(delay, MAX_SLEEP))
                continue
            heapq.heappop(self._heap)
            self._dispatch(job, when)
            self._push(job, index, self._catch_up(job, when))

    def _push(self, job: Job, index: int, after: datetime) -> None:
        following = job.schedule.next_after(after)
        if following is not None:
            heapq.heappush(self._heap, (following, index, job))

    def _catch_up(self, job: Job, fired: datetime) -> datetime:
        """Where to look for the next firing: right after ``fired``, unless the process
        stalled so long that the backlog would flood the ledger with misfires."""
        horizon = self._clock.now() - timedelta(seconds=job.misfire_grace)
        period = job.schedule.min_period
        if period is None or (horizon - fired).total_seconds() < period * MAX_BACKLOG:
            return fired
        log.warning(
            "skipping a backlog of firings after a stall",
            extra={
                "fields": {"job": job.name, "from": fired.isoformat(), "to": horizon.isoformat()}
            },
        )
        return horizon
