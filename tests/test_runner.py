"""One replica in process (``singleton.runner.Runner``): dispatch, overlap and graceful
shutdown. ``Runner.run`` runs in a thread (it installs signal handlers only in the main
thread) and is stopped with ``runner.stop()``, as a signal would."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from singleton.app import App
from singleton.backends.base import Backend
from singleton.backends.memory import MemoryBackend
from singleton.backends.sqlite import SqliteBackend
from singleton.config import Settings
from singleton.jobs import Job
from singleton.runner import Runner
from singleton.schedule import every_schedule, run_id
from singleton.targets import CommandTarget
from tests.firing_support import (
    Background,
    Recorder,
    fire_time,
    make_job,
    states,
    until_set,
    wait_for,
)

SqliteFactory = Callable[[], SqliteBackend]


@pytest.fixture
def open_sqlite(tmp_path: Path) -> Iterator[SqliteFactory]:
    opened: list[SqliteBackend] = []

    def factory() -> SqliteBackend:
        backend = SqliteBackend(f"sqlite:///{tmp_path / 'state.db'}")
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        backend.close()


def every_second(name: str, target: Any, **overrides: Any) -> Job:
    return make_job(name, target, schedule=every_schedule(1), **overrides)


def make_runner(
    tmp_path: Path, backend: Backend, jobs: list[Job], **settings: Any
) -> tuple[Runner, Recorder]:
    """A runner for ``jobs``; ``settings`` are top-level durations in seconds."""
    written = {key: f"{value * 1000:g}ms" for key, value in settings.items()}
    app = App(
        Settings.model_validate({"replica_id": "r1", "backend": {"url": backend.url}, **written}),
        tmp_path,
        {job.name: job for job in jobs},
    )
    runner = Runner(app, backend)
    recorder = Recorder()
    runner.events.add(recorder)
    return runner, recorder


@contextmanager
def running(runner: Runner) -> Iterator[Background]:
    """``runner.run()`` in a thread; stopped and joined on the way out if the test did not."""
    codes: list[int] = []
    loop = Background(lambda: codes.append(runner.run()))
    try:
        yield loop
    finally:
        runner.stop()
        loop.join(10.0)
    assert codes == [0]


def test_a_runner_fires_a_job_at_its_scheduled_instants(tmp_path: Path) -> None:
    backend = MemoryBackend()
    seen: list[datetime] = []
    job = every_second("tick", lambda ctx: seen.append(ctx.scheduled_at))
    runner, _ = make_runner(tmp_path, backend, [job])

    with running(runner):
        wait_for("a firing", lambda: backend.history("tick", 0))

    [row] = backend.history("tick", 0)
    assert row.state == "succeeded"
    assert seen == [row.scheduled_at]
    assert row.scheduled_at.microsecond == 0


# --- graceful shutdown -----------------------------------------------------------------------


class SlowToForget(MemoryBackend):
    """Deletes shared state slowly, as a coordinator far away would."""

    def delete(self, key: str) -> None:
        time.sleep(0.3)
        super().delete(key)


def test_a_runner_has_left_the_fleet_when_run_returns(tmp_path: Path) -> None:
    """The caller closes the backend next: a withdrawal still on its way would find it
    closed, and the fleet would list a gone replica until its record expired."""
    backend = SlowToForget()
    runner, _ = make_runner(tmp_path, backend, [every_second("tick", lambda: None)])
    left: list[dict[str, str]] = []
    loop = Background(lambda: (runner.run(), left.append(backend.scan("fleet/"))))
    wait_for("the fleet record", lambda: backend.scan("fleet/"))

    runner.stop()
    loop.join(10.0)

    assert left == [{}]


def test_shutdown_gives_a_running_command_its_grace_then_interrupts_it(
    tmp_path: Path, open_sqlite: SqliteFactory
) -> None:
    backend, elsewhere = open_sqlite(), open_sqlite()
    job = every_second("long", CommandTarget(["sleep", "30"], kill_grace=2.0))
    runner, events = make_runner(tmp_path, backend, [job], shutdown_grace=0.4, kill_grace=2.0)

    with running(runner) as loop:
        started = events.wait_for("started")
        stopped = time.monotonic()
        runner.stop()
        loop.join(5.0)
        took = time.monotonic() - stopped

    assert 0.4 <= took < 2.0, "the job had its shutdown_grace, then was stopped at once"
    [row] = backend.attempts(started.run_id or "")
    assert (row.state, row.error) == ("interrupted", "killed by SIGTERM")
    lease = elsewhere.try_acquire("long", 5.0, "r2:1")
    assert lease is not None, "the lease was released, so a standby elsewhere takes over at once"
    elsewhere.release(lease)


def test_a_job_that_ends_within_the_shutdown_grace_is_recorded_as_it_ended(
    tmp_path: Path,
) -> None:
    backend = MemoryBackend()
    job = every_second("short", lambda: time.sleep(0.4))
    runner, events = make_runner(tmp_path, backend, [job], shutdown_grace=3.0)

    with running(runner) as loop:
        started = events.wait_for("started")
        runner.stop()
        loop.join(5.0)

    assert [row.state for row in backend.attempts(started.run_id or "")] == ["succeeded"]
    assert backend.holder("short") is None


def test_a_sync_call_that_ignores_the_stop_is_recorded_interrupted_and_its_lease_released(
    tmp_path: Path,
) -> None:
    backend = MemoryBackend()
    with until_set(threading.Event()) as unblock:
        job = every_second("stubborn", lambda: unblock.wait(10))
        runner, events = make_runner(tmp_path, backend, [job], shutdown_grace=0.1, kill_grace=0.0)

        with running(runner) as loop:
            started = events.wait_for("started")
            runner.stop()
            loop.join(5.0)

        [row] = backend.attempts(started.run_id or "")
        assert (row.state, row.error) == ("interrupted", "shutdown: the job did not stop")
        assert backend.holder("stubborn") is None
        unblock.set()
        # When the function finally returns, its stale outcome is refused.
        assert events.wait_for("finish_refused").fields["state"] == "interrupted"
    assert [row.state for row in backend.attempts(started.run_id or "")] == ["interrupted"]


def test_a_standby_gives_up_promptly_on_stop_and_records_nothing(
    tmp_path: Path, open_sqlite: SqliteFactory
) -> None:
    backend, elsewhere = open_sqlite(), open_sqlite()
    held = elsewhere.try_acquire("compact", 30.0, "owner-elsewhere:1")
    assert held is not None
    job = every_second("compact", lambda: None)
    runner, events = make_runner(tmp_path, backend, [job], shutdown_grace=10.0)

    with running(runner) as loop:
        events.wait_for("standby")
        stopped = time.monotonic()
        runner.stop()
        loop.join(5.0)
        took = time.monotonic() - stopped

    assert took < 1.0
    assert backend.history("compact", 0) == []
    holder = backend.holder("compact")
    assert holder is not None and holder.owner == "owner-elsewhere:1"
    elsewhere.release(held)


# --- dispatch --------------------------------------------------------------------------------


def test_a_firing_due_while_the_previous_one_runs_here_is_recorded_as_overlap(
    tmp_path: Path,
) -> None:
    backend = MemoryBackend()
    with until_set(threading.Event()) as proceed:
        job = make_job("compact", lambda: proceed.wait(5))
        runner, events = make_runner(tmp_path, backend, [job])
        first, second = fire_time(seconds_ago=1.0), fire_time()

        runner.dispatch(job, first)
        events.wait_for("started")
        runner.dispatch(job, second)
        skipped = events.wait_for("skipped", reason="overlap")
        proceed.set()
        wait_for("the first firing to end", lambda: states(backend, "compact", first)[-1:])

    assert skipped.run_id == run_id("compact", second)
    assert skipped.fields["recorded"] is True
    [row] = backend.attempts(run_id("compact", second))
    assert (row.state, row.reason, row.replica) == ("skipped", "overlap", "r1")
    assert wait_for("success", lambda: states(backend, "compact", first) == [(1, "succeeded")])


def standing_by(
    tmp_path: Path, open_sqlite: SqliteFactory, first: datetime
) -> tuple[Runner, Recorder, Job, list[str], Callable[[], None]]:
    """A runner standing by for the firing ``first`` of ``compact`` while an owner elsewhere
    holds the lock; with what the job ran, and a call that frees the lock (the owner
    elsewhere is done, or gone)."""
    backend, elsewhere = open_sqlite(), open_sqlite()
    held = elsewhere.try_acquire("compact", 30.0, "owner-elsewhere:1")
    assert held is not None
    ran: list[str] = []
    job = make_job("compact", lambda ctx: ran.append(ctx.run_id))
    runner, events = make_runner(tmp_path, backend, [job])
    runner.dispatch(job, first)
    events.wait_for("standby")
    return runner, events, job, ran, lambda: elsewhere.release(held)


def test_a_firing_due_while_this_replica_stands_by_runs_after_the_standby(
    tmp_path: Path, open_sqlite: SqliteFactory
) -> None:
    first, second = fire_time(seconds_ago=1.0), fire_time()
    runner, events, job, ran, free = standing_by(tmp_path, open_sqlite, first)

    runner.dispatch(job, second)
    queued = events.wait_for("buffered")
    free()
    wait_for("both firings", lambda: len(ran) == 2)

    assert queued.run_id == run_id("compact", second)
    assert ran == [run_id("compact", first), run_id("compact", second)]


def test_a_firing_due_while_this_replica_only_checks_a_done_one_is_not_skipped(
    tmp_path: Path,
) -> None:
    backend = MemoryBackend()
    ran: list[str] = []
    job = make_job("compact", lambda ctx: ran.append(ctx.run_id))
    first, second = fire_time(seconds_ago=1.0), fire_time()
    owner, _ = make_runner(tmp_path, backend, [job])
    owner.firer.fire(job, first)
    checker, _ = make_runner(tmp_path, backend, [job])
    releasing, go_on = threading.Event(), threading.Event()
    release = backend.release

    def slow_release(lease: Any, keep_for: float = 0.0) -> None:
        releasing.set()  # still holding the lock, having found the first firing done
        go_on.wait(5)
        release(lease, keep_for)

    backend.release = slow_release  # type: ignore[method-assign]
    checker.dispatch(job, first)
    assert releasing.wait(5)
    checker.dispatch(job, second)  # its instant comes during the check
    go_on.set()
    wait_for("the second firing", lambda: len(ran) == 2)

    assert ran == [run_id("compact", first), run_id("compact", second)]
    assert backend.attempts(run_id("compact", second))[0].state == "succeeded"


def test_a_standby_keeps_only_the_newest_waiting_firing_and_records_the_one_it_replaces(
    tmp_path: Path, open_sqlite: SqliteFactory
) -> None:
    first, second, third = fire_time(2.0), fire_time(1.0), fire_time()
    runner, _, job, ran, free = standing_by(tmp_path, open_sqlite, first)

    runner.dispatch(job, second)
    runner.dispatch(job, third)
    replaced_id = run_id("compact", second)
    wait_for("the replaced one recorded", lambda: runner.backend.attempts(replaced_id))
    free()
    wait_for("the first and the newest", lambda: len(ran) == 2)

    assert ran == [run_id("compact", first), run_id("compact", third)]
    [replaced] = runner.backend.attempts(replaced_id)
    assert (replaced.state, replaced.reason) == ("skipped", "overlap")
