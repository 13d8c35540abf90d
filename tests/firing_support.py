"""Builders shared by the firing, lease, scheduler and runner tests.

Everything here is real: jobs are :class:`~singleton.jobs.Job` values, replicas are
:class:`~singleton.firing.Firer` objects on real backends, and outcomes are read from the
ledger and from the events a replica emits, polled with a bounded wait instead of sleeps.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from singleton.backends.base import Attempt, Backend, Claim, Lease, Run
from singleton.backends.sqlite import SqliteBackend
from singleton.clock import SYSTEM_CLOCK, Clock
from singleton.events import Event, Events
from singleton.firing import Firer
from singleton.jobs import Job
from singleton.schedule import every_schedule, run_id
from singleton.targets import CallTarget, CommandTarget, Target

T = TypeVar("T")

#: Settings of a test job unless a test overrides them: short enough to keep tests fast,
#: long enough that nothing expires by accident on a loaded machine.
JOB_DEFAULTS: dict[str, Any] = {
    "mode": "singleton",
    "timezone": "UTC",
    "lock_ttl": 2.0,
    "lock_at_least_for": 0.0,
    "misfire_grace": 10.0,
    "jitter": 0.0,
    "max_attempts": 1,
    "retry_backoff": 0.05,
    "on_orphan": "rerun",
    "overlap": "skip",
    "catchup": "none",
    "catchup_window": 10.0,
    "pause_on_failure": None,
    "timeout": None,
    "output_limit": 65536,
}


def make_job(name: str, target: Target | Callable[..., object], **overrides: Any) -> Job:
    """A resolved job on a fixed ``every: 60s`` schedule; ``target`` may be a bare function."""
    runnable = target if isinstance(target, CallTarget | CommandTarget) else None
    if runnable is None:
        assert callable(target)
        runnable = CallTarget(target, name)
    settings = {**JOB_DEFAULTS, "schedule": every_schedule(60), **overrides}
    return Job(name=name, target=runnable, **settings)


def fire_time(seconds_ago: float = 0.0) -> datetime:
    """A firing instant ``seconds_ago`` before now. Not rounded to the second, so that
    ``late`` is exactly ``seconds_ago``; the run ID is written in whole seconds anyway."""
    return datetime.now(UTC) - timedelta(seconds=seconds_ago)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 3.0) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.01)


class Recorder:
    """An events listener that keeps every event, with the monotonic time it arrived."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.events: list[Event] = []
        self.times: list[float] = []

    def __call__(self, event: Event) -> None:
        with self._cond:
            self.events.append(event)
            self.times.append(time.monotonic())
            self._cond.notify_all()

    def kinds(self) -> list[str]:
        with self._cond:
            return [event.kind for event in self.events]

    def of(self, kind: str) -> list[Event]:
        with self._cond:
            return [event for event in self.events if event.kind == kind]

    def time_of(self, kind: str) -> float:
        """When the first event of ``kind`` arrived (monotonic)."""
        with self._cond:
            for event, at in zip(self.events, self.times, strict=True):
                if event.kind == kind:
                    return at
        raise AssertionError(f"no {kind!r} event in {self.kinds()}")

    def times_of(self, kind: str) -> list[float]:
        """When each event of ``kind`` arrived (monotonic), in order."""
        with self._cond:
            return [
                at for event, at in zip(self.events, self.times, strict=True) if event.kind == kind
            ]

    def wait_for(self, kind: str, timeout: float = 3.0, **fields: Any) -> Event:
        """The first event of ``kind`` whose fields include ``fields``, waiting if need be."""

        def match() -> Event | None:
            for event in self.events:
                if event.kind == kind and all(
                    event.fields.get(key) == value for key, value in fields.items()
                ):
                    return event
            return None

        deadline = time.monotonic() + timeout
        with self._cond:
            while (found := match()) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {kind!r} event with {fields} within {timeout:g}s: {self.kinds()}"
                    )
                self._cond.wait(left)
            return found


@dataclass
class Replica:
    """One replica's firing policy on its own backend object, with its events recorded."""

    name: str
    backend: Backend
    firer: Firer
    recorder: Recorder
    stopping: threading.Event = field(default_factory=threading.Event)

    def fire(self, job: Job, scheduled_at: datetime) -> None:
        self.firer.fire(job, scheduled_at)

    def fire_in_background(self, job: Job, scheduled_at: datetime) -> Background:
        return Background(self.firer.fire, job, scheduled_at)


def make_replica(backend: Backend, name: str = "r1", clock: Clock = SYSTEM_CLOCK) -> Replica:
    recorder = Recorder()
    events = Events(name)
    events.add(recorder)
    stopping = threading.Event()
    firer = Firer(backend, name, clock, events, stopping)
    return Replica(name, backend, firer, recorder, stopping)


class Background:
    """A call in a daemon thread whose exception is re-raised by :meth:`join`."""

    def __init__(self, func: Callable[..., object], *args: Any) -> None:
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.ended: float | None = None

        def body() -> None:
            try:
                func(*args)
            except BaseException as exc:
                self.error = exc
            finally:
                self.ended = time.monotonic()

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    def join(self, timeout: float = 5.0) -> float:
        """Wait for the call to end; return how long it took."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still running after {timeout:g}s"
        if self.error is not None:
            raise self.error
        assert self.ended is not None
        return self.ended - self.started


def states(backend: Backend, job: str, scheduled_at: datetime) -> list[tuple[int, str]]:
    """``(attempt, state)`` of one firing, oldest attempt first."""
    rows = backend.attempts(run_id(job, scheduled_at))
    return [(row.attempt, row.state) for row in reversed(rows)]


def attempts_of(backend: Backend, job: str, scheduled_at: datetime) -> list[Attempt]:
    """Every attempt of one firing, oldest first."""
    return list(reversed(backend.attempts(run_id(job, scheduled_at))))


def steal_sqlite_lock(path: Path, name: str, thief: str = "thief", for_seconds: float = 60) -> int:
    """What a coordinator that forgot a lease would do: give ``name`` to someone else with a
    higher token, behind the holder's back. Returns the thief's token."""
    with contextlib.closing(sqlite3.connect(path, timeout=5, isolation_level=None)) as conn:
        conn.execute(
            "UPDATE singleton_locks SET owner = ?, token = token + 1, expires = expires + ?"
            " WHERE name = ?",
            (thief, for_seconds, name),
        )
        row = conn.execute("SELECT token FROM singleton_locks WHERE name = ?", (name,)).fetchone()
    return int(row[0])


@contextlib.contextmanager
def until_set(event: threading.Event) -> Iterator[threading.Event]:
    """Yield ``event`` and set it on the way out, so a blocked job never outlives its test."""
    try:
        yield event
    finally:
        event.set()


class LateFirstReply(SqliteBackend):
    """Reads the reply to its first grant ``late`` seconds after the acquire went out (a GC
    pause or SIGSTOP between send and reply: TESTING F2b); ``first_token`` is that grant's."""

    def __init__(self, url: str, late: float) -> None:
        super().__init__(url)
        self.late = late
        self.first_token = 0

    def _reply(self, lease: Lease | None) -> None:
        if lease is not None and self.late:
            self.first_token = lease.token
            time.sleep(self.late)
            self.late = 0.0

    def try_acquire(self, name: str, ttl: float, owner: str) -> Lease | None:
        lease = super().try_acquire(name, ttl, owner)
        self._reply(lease)
        return lease

    def acquire_and_claim(self, run: Run, ttl: float, owner: str) -> tuple[Lease, Claim] | None:
        got = super().acquire_and_claim(run, ttl, owner)
        self._reply(got[0] if got else None)
        return got
