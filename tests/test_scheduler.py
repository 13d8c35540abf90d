"""The timing loop: it hands on each job's schedule instants (never the time it woke), in
time order, and after a stall at most ``MAX_BACKLOG`` overdue firings per job."""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime, timedelta

from singleton.clock import SYSTEM_CLOCK
from singleton.jobs import Job
from singleton.schedule import at_schedule, every_schedule
from singleton.scheduler import MAX_BACKLOG, Scheduler
from tests.firing_support import Background, make_job, wait_for

START = datetime(2026, 12, 1, 12, 0, 0, 400_000, tzinfo=UTC)


class FakeClock:
    """Wall and monotonic time that move only when the scheduler waits, or the test says."""

    def __init__(self, start: datetime = START) -> None:
        self.wall = start
        self.mono = 0.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if not event.is_set():
            self.jump(timeout)
        return event.is_set()

    def sleep(self, seconds: float) -> None:
        self.jump(seconds)

    def jump(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += max(0.0, seconds)


class Dispatched:
    """A dispatch callback recording ``(job, scheduled_at, now)``; sets ``stop`` after
    ``until`` calls."""

    def __init__(self, clock: FakeClock | None, stop: threading.Event, until: int) -> None:
        self.clock = clock
        self.stop = stop
        self.until = until
        self.calls: list[tuple[str, datetime, datetime]] = []

    def __call__(self, job: Job, scheduled_at: datetime) -> None:
        now = self.clock.now() if self.clock is not None else SYSTEM_CLOCK.now()
        self.calls.append((job.name, scheduled_at, now))
        if len(self.calls) >= self.until:
            self.stop.set()

    @property
    def instants(self) -> list[datetime]:
        return [when for _, when, _ in self.calls]


def every(name: str, seconds: int, **overrides: object) -> Job:
    return make_job(name, lambda: None, schedule=every_schedule(seconds), **overrides)


def test_every_second_is_dispatched_at_consecutive_whole_seconds_on_the_system_clock() -> None:
    stop = threading.Event()
    dispatched = Dispatched(None, stop, until=3)
    scheduler = Scheduler([every("tick", 1)], SYSTEM_CLOCK, dispatched)

    Background(scheduler.run, stop).join(5.0)

    instants = dispatched.instants
    assert all(when.microsecond == 0 and when.tzinfo is not None for when in instants)
    assert len(instants) == 3
    assert one_second_apart(instants)
    for _, when, now in dispatched.calls:
        assert when <= now < when + timedelta(seconds=0.5), "dispatched on time, not early"


def test_it_hands_on_the_schedules_instant_not_the_time_it_woke() -> None:
    clock = FakeClock()
    stop = threading.Event()
    dispatched = Dispatched(clock, stop, until=3)

    Scheduler([every("ten", 10)], clock, dispatched).run(stop)

    assert dispatched.instants == [
        datetime(2026, 12, 1, 12, 0, 10, tzinfo=UTC),
        datetime(2026, 12, 1, 12, 0, 20, tzinfo=UTC),
        datetime(2026, 12, 1, 12, 0, 30, tzinfo=UTC),
    ]
    assert all(now >= when for _, when, now in dispatched.calls)


def test_a_host_clock_ahead_of_the_coordinators_waits_the_difference_out() -> None:
    clock = FakeClock()
    stop = threading.Event()
    dispatched = Dispatched(clock, stop, until=3)

    Scheduler([every("ten", 10)], clock, dispatched, ahead=lambda: 2.5).run(stop)

    assert dispatched.instants[0] == datetime(2026, 12, 1, 12, 0, 10, tzinfo=UTC)
    assert all(now >= when + timedelta(seconds=2.5) for _, when, now in dispatched.calls)


def test_several_jobs_are_dispatched_in_time_order() -> None:
    clock = FakeClock()
    stop = threading.Event()
    dispatched = Dispatched(clock, stop, until=7)

    Scheduler([every("two", 2), every("three", 3)], clock, dispatched).run(stop)

    def at(second: int) -> datetime:
        return datetime(2026, 12, 1, 12, 0, second, tzinfo=UTC)

    assert [(name, when) for name, when, _ in dispatched.calls] == [
        ("two", at(2)),
        ("three", at(3)),
        ("two", at(4)),
        ("two", at(6)),
        ("three", at(6)),
        ("two", at(8)),
        ("three", at(9)),
    ]


def run_through_a_stall(stall: float, misfire_grace: float) -> tuple[list[datetime], datetime]:
    """An every-second job whose process stalls for ``stall`` seconds right after its first
    firing; the loop runs until it is back on time. Returns the instants handed on after the
    first one, and when the process woke."""
    clock = FakeClock()
    stop = threading.Event()
    dispatched = Dispatched(clock, stop, until=10_000)
    woke: list[datetime] = []

    def dispatch(job: Job, scheduled_at: datetime) -> None:
        dispatched(job, scheduled_at)
        if not woke:
            clock.jump(stall)
            woke.append(clock.now())
        elif scheduled_at > woke[0]:
            stop.set()

    Scheduler([every("tick", 1, misfire_grace=misfire_grace)], clock, dispatch).run(stop)
    first = dispatched.instants[0]
    assert first == datetime(2026, 12, 1, 12, 0, 1, tzinfo=UTC)
    return [when for when in dispatched.instants[1:] if when <= woke[0]], woke[0]


def one_second_apart(instants: list[datetime]) -> bool:
    return all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(instants))


def test_after_a_long_stall_at_most_max_backlog_overdue_firings_are_handed_on() -> None:
    overdue, woke = run_through_a_stall(stall=1000.0, misfire_grace=5.0)

    assert 0 < len(overdue) <= MAX_BACKLOG
    assert one_second_apart(overdue)
    assert overdue[-1] == woke.replace(microsecond=0), "the backlog ends at the present"
    assert woke - overdue[0] <= timedelta(seconds=5), "only firings within the grace remain"


def test_after_a_short_stall_every_missed_firing_is_handed_on_in_order() -> None:
    overdue, woke = run_through_a_stall(stall=50.0, misfire_grace=5.0)

    # Each is then recorded by the firing (misfired when older than the grace).
    assert len(overdue) == 50
    assert overdue[0] == datetime(2026, 12, 1, 12, 0, 2, tzinfo=UTC)
    assert one_second_apart(overdue)
    assert overdue[-1] == woke.replace(microsecond=0)


def test_a_wall_clock_stepped_back_never_dispatches_an_instant_twice() -> None:
    clock = FakeClock()
    stop = threading.Event()
    dispatched = Dispatched(clock, stop, until=4)
    stepped: list[bool] = []

    def dispatch(job: Job, scheduled_at: datetime) -> None:
        dispatched(job, scheduled_at)
        if not stepped:
            stepped.append(True)
            clock.jump(-30.0)  # NTP steps the clock back half a minute

    Scheduler([every("tick", 1)], clock, dispatch).run(stop)

    assert len(set(dispatched.instants)) == len(dispatched.instants) == 4
    assert dispatched.instants == sorted(dispatched.instants)


def test_a_one_shot_schedule_is_dispatched_once_and_the_loop_ends() -> None:
    clock = FakeClock()
    stop = threading.Event()
    dispatched = Dispatched(clock, stop, until=100)
    moment = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC)

    Scheduler(
        [make_job("once", lambda: None, schedule=at_schedule(moment))], clock, dispatched
    ).run(stop)

    assert dispatched.instants == [moment]
    assert not stop.is_set(), "the loop ended on its own: nothing left to schedule"


def test_the_loop_ends_promptly_when_stopped() -> None:
    stop = threading.Event()
    dispatched = Dispatched(None, stop, until=100)
    scheduler = Scheduler([every("hourly", 3600)], SYSTEM_CLOCK, dispatched)
    loop = Background(scheduler.run, stop)
    wait_for("the first wait", lambda: scheduler.next_fire_times())
    stopped = time.monotonic()
    stop.set()
    loop.join(2.0)

    assert time.monotonic() - stopped < 0.5
    assert dispatched.calls == []


def test_next_fire_times_shows_each_jobs_next_instant() -> None:
    clock = FakeClock()
    stop = threading.Event()
    seen: list[dict[str, datetime]] = []
    scheduler: Scheduler

    def dispatch(job: Job, scheduled_at: datetime) -> None:
        seen.append(scheduler.next_fire_times())
        stop.set()

    scheduler = Scheduler([every("two", 2), every("three", 3)], clock, dispatch)
    scheduler.run(stop)

    assert seen == [{"three": datetime(2026, 12, 1, 12, 0, 3, tzinfo=UTC)}]
    assert scheduler.next_fire_times() == {
        "two": datetime(2026, 12, 1, 12, 0, 4, tzinfo=UTC),
        "three": datetime(2026, 12, 1, 12, 0, 3, tzinfo=UTC),
    }
