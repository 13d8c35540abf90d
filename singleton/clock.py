"""Time, injected: wall time for fire times and records, monotonic time for every deadline."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    """The three things core code asks of time; tests pass a fake one."""

    def now(self) -> datetime:
        """The wall clock, timezone-aware UTC. Used for fire times and ledger records only."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never jumps. Every lease deadline is on this clock."""
        ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Block until ``event`` is set or ``timeout`` seconds pass; True if it was set."""
        ...

    def sleep(self, seconds: float) -> None:
        """Block for ``seconds``."""
        ...


_NEVER = threading.Event()


class SystemClock:
    """The real clocks of this host."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(max(0.0, timeout))

    def sleep(self, seconds: float) -> None:
        # Not time.sleep: under libfaketime (how clock skew is tested) its absolute
        # clock_nanosleep fails with EINVAL, while a timed wait on an event works.
        _NEVER.wait(max(0.0, seconds))


SYSTEM_CLOCK = SystemClock()


def iso_z(moment: datetime, *, millis: bool = False) -> str:
    """UTC ISO-8601 with a ``Z``, the only time format in our contracts."""
    moment = moment.astimezone(UTC)
    if millis:
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_iso(text: str) -> datetime:
    """Read a time written by :func:`iso_z` (or any ISO-8601 with an offset) as UTC."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"time {text!r} has no timezone; add Z or an offset")
    return moment.astimezone(UTC)
