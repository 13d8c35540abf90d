"""The cluster-wide pause switch: ``singleton pause``, ``resume`` and ``pause_on_failure``.

The switch lives in the backend's shared state (``paused/<job>``), so every replica obeys
the same one whichever replica or operator flipped it. Replicas read it in the background,
one scan for all jobs every :data:`REFRESH` seconds, instead of on the firing path: a firing
stays at the two round trips of its fused fast paths. A firing trusts the last read only
while it is younger than :data:`FRESH` (measured from when the read was *sent*), and reads
again itself otherwise; ``singleton pause`` returns only after ``FRESH`` has passed since
its write. So once the command returns, no replica starts a firing of that job.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from singleton.backends.base import FAILED, SKIPPED, TIMED_OUT, Attempt, SharedState
from singleton.clock import Clock, iso_z, parse_iso

log = logging.getLogger("singleton.pausing")

#: Shared-state keys: ``paused/<job>`` → the JSON of a :class:`Pause`.
PREFIX = "paused/"
#: How often a replica reads the switches.
REFRESH = 1.0
#: How old a read a firing may trust; ``singleton pause`` waits this long before returning.
FRESH = 2.0
#: A pause ``--until`` a time is removed by the coordinator this long after it ended (the
#: readers already ignore it from that time on; this only tidies up).
EXPIRED_KEPT = 60.0
#: Final states of a run that count towards ``pause_on_failure``.
FAILURES = frozenset({FAILED, TIMED_OUT})


@dataclass(frozen=True)
class Pause:
    """Who paused a job, when, why, and until when (None: until ``resume``)."""

    job: str
    by: str
    at: datetime
    note: str | None = None
    until: datetime | None = None

    def active(self, now: datetime) -> bool:
        return self.until is None or now < self.until

    def to_json(self) -> dict[str, Any]:
        """The shape ``status --json`` and ``/status`` show under a job's ``paused``."""
        return {
            "by": self.by,
            "at": iso_z(self.at),
            "note": self.note,
            "until": iso_z(self.until) if self.until else None,
        }

    @classmethod
    def from_json(cls, job: str, text: str) -> Pause:
        data = json.loads(text)
        return cls(
            job=job,
            by=str(data["by"]),
            at=parse_iso(data["at"]),
            note=data.get("note"),
            until=parse_iso(data["until"]) if data.get("until") else None,
        )


def pause(state: SharedState, pause: Pause) -> None:
    """Flip the switch on (replacing an earlier pause of the job: its note, its end)."""
    ttl = None
    if pause.until is not None:
        ttl = (pause.until - pause.at).total_seconds() + EXPIRED_KEPT
    state.put(PREFIX + pause.job, json.dumps(pause.to_json(), sort_keys=True), ttl=ttl)


def resume(state: SharedState, job: str) -> None:
    state.delete(PREFIX + job)


def read(state: SharedState, now: datetime) -> dict[str, Pause]:
    """The jobs paused now. A record this version cannot read is ignored with a warning:
    a newer replica's format must not stop this one's jobs, nor start them by error."""
    found: dict[str, Pause] = {}
    for key, value in state.scan(PREFIX).items():
        job = key.removeprefix(PREFIX)
        try:
            item = Pause.from_json(job, value)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning(
                "unreadable pause record", extra={"fields": {"key": key, "error": str(exc)}}
            )
            continue
        if item.active(now):
            found[job] = item
    return found


class PauseWatch:
    """One replica's view of the switches: refreshed in the background, read by firings."""

    def __init__(self, state: SharedState, clock: Clock) -> None:
        self._state = state
        self._clock = clock
        self._lock = threading.Lock()
        self._pauses: dict[str, Pause] = {}
        self._read_at = float("-inf")
        self._failing = False

    def refresh(self) -> dict[str, Pause]:
        """Read the switches now; raises what the backend raises (the last read stays)."""
        sent = self._clock.monotonic()
        found = read(self._state, self._clock.now())
        with self._lock:
            if sent >= self._read_at:
                self._pauses, self._read_at = found, sent
        return found

    def get(self, job: str) -> Pause | None:
        """The job's pause, if any, from a read younger than :data:`FRESH`. If the
        coordinator cannot be read, the last read decides: the firing's own acquire will
        meet the same outage."""
        with self._lock:
            stale = self._clock.monotonic() - self._read_at > FRESH
        if stale:
            try:
                self.refresh()
            except Exception as exc:
                log.warning(
                    "reading the pause switches failed", extra={"fields": {"error": str(exc)}}
                )
        with self._lock:
            found = self._pauses.get(job)
        return found if found is not None and found.active(self._clock.now()) else None

    def paused(self) -> dict[str, Pause]:
        """Every pause of the last read (for metrics)."""
        with self._lock:
            return dict(self._pauses)

    def run(
        self, stop: threading.Event, on_read: Callable[[Mapping[str, Pause]], None] | None = None
    ) -> None:
        """Refresh every :data:`REFRESH` seconds until ``stop``; an outage is logged once."""
        while not stop.is_set():
            try:
                found = self.refresh()
            except Exception as exc:
                if not self._failing:
                    log.warning(
                        "reading the pause switches failed",
                        extra={"fields": {"error": str(exc)}},
                    )
                self._failing = True
            else:
                self._failing = False
                if on_read is not None:
                    on_read(found)
            self._clock.wait(stop, REFRESH)


def failure_streak(rows: Iterable[Attempt]) -> int:
    """How many of the newest runs, in a row, ended failed or timed out.

    ``rows`` are attempts newest first (``history``); a run counts by its latest attempt,
    so a failure followed by a successful retry is a success. Skipped firings never ran
    and do not count either way; a run still going ends the streak.
    """
    streak = 0
    seen: set[str] = set()
    for row in rows:
        if row.run_id in seen or row.state == SKIPPED:
            continue
        seen.add(row.run_id)
        if row.state not in FAILURES:
            break
        streak += 1
    return streak
