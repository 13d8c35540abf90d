"""Overlap policies: what a replica does with a firing that comes while the job's previous
firing still runs here (``overlap:``). Firings are dispatched by hand, as the scheduler
would, to a runner that is not started, so each test chooses exactly when firings come."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from singleton.backends.memory import MemoryBackend
from singleton.context import JobContext
from singleton.errors import ConfigError
from singleton.jobs import Job, resolve
from singleton.runner import MAX_BUFFERED, Runner
from singleton.schedule import run_id
from singleton.targets import CommandTarget
from tests.firing_support import Recorder, fire_time, make_job, states, until_set, wait_for
from tests.test_runner import make_runner


class Gate:
    """A job body that records its firings and blocks until the test opens the gate."""

    def __init__(self, opened: threading.Event) -> None:
        self.opened = opened
        self.ran: list[str] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, ctx: JobContext) -> None:
        with self._lock:
            self.ran.append(ctx.run_id)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            while not self.opened.wait(0.01):
                ctx.check()
        finally:
            with self._lock:
                self.running -= 1


def three_firings() -> list[datetime]:
    return [fire_time(seconds_ago=3.0), fire_time(seconds_ago=2.0), fire_time(seconds_ago=1.0)]


@dataclass
class Busy:
    """A runner whose job ``report`` runs a firing, held inside ``gate`` until ``opened``."""

    gate: Gate
    job: Job
    runner: Runner
    events: Recorder
    opened: threading.Event


@contextmanager
def running_one(
    tmp_path: Path, backend: MemoryBackend, first: datetime, overlap: str, **options: Any
) -> Iterator[Busy]:
    """Dispatch ``first`` and wait until it runs; the gate opens on the way out anyway."""
    with until_set(threading.Event()) as opened:
        gate = Gate(opened)
        job = make_job("report", gate, overlap=overlap, **options)
        runner, events = make_runner(tmp_path, backend, [job])
        runner.dispatch(job, first)
        events.wait_for("started")
        yield Busy(gate, job, runner, events, opened)


def test_skip_records_each_firing_that_comes_while_one_runs(tmp_path: Path) -> None:
    backend = MemoryBackend()
    first, second, third = three_firings()
    with running_one(tmp_path, backend, first, "skip") as busy:
        busy.runner.dispatch(busy.job, second)
        busy.runner.dispatch(busy.job, third)
        wait_for("two overlaps", lambda: len(busy.events.of("skipped")) == 2)
        busy.opened.set()
        wait_for("the first to end", lambda: states(backend, "report", first) == [(1, "succeeded")])

    for when in (second, third):
        [row] = backend.attempts(run_id("report", when))
        assert (row.state, row.reason) == ("skipped", "overlap")
    assert busy.gate.ran == [run_id("report", first)]


def test_buffer_one_runs_the_first_waiting_firing_after_and_skips_the_rest(
    tmp_path: Path,
) -> None:
    backend = MemoryBackend()
    first, second, third = three_firings()
    with running_one(tmp_path, backend, first, "buffer_one", misfire_grace=4.0) as busy:
        busy.runner.dispatch(busy.job, second)
        busy.runner.dispatch(busy.job, third)
        busy.events.wait_for("skipped", reason="overlap")
        time.sleep(2.5)  # past misfire_grace: a buffered firing runs late on purpose
        busy.opened.set()
        wait_for(
            "the buffered one", lambda: states(backend, "report", second) == [(1, "succeeded")]
        )

    assert busy.gate.ran == [run_id("report", first), run_id("report", second)]
    [row] = backend.attempts(run_id("report", third))
    assert (row.state, row.reason) == ("skipped", "overlap")


def test_buffer_all_runs_every_waiting_firing_in_order(tmp_path: Path) -> None:
    backend = MemoryBackend()
    firings = three_firings()
    with running_one(tmp_path, backend, firings[0], "buffer_all") as busy:
        busy.runner.dispatch(busy.job, firings[1])
        busy.runner.dispatch(busy.job, firings[2])
        busy.opened.set()
        wait_for("all three", lambda: len(backend.history("report", 0)) == 3)

    assert busy.gate.ran == [run_id("report", when) for when in firings]
    assert busy.gate.most_at_once == 1
    assert {row.state for row in backend.history("report", 0)} == {"succeeded"}


def test_buffer_all_keeps_at_most_its_bound_waiting(tmp_path: Path) -> None:
    backend = MemoryBackend()
    with running_one(tmp_path, backend, fire_time(), "buffer_all") as busy:
        for seconds_ago in range(MAX_BUFFERED + 1, 0, -1):
            busy.runner.dispatch(busy.job, fire_time(seconds_ago=seconds_ago))
        overlap = busy.events.wait_for("skipped", reason="overlap")
        assert len(busy.events.of("buffered")) == MAX_BUFFERED
        assert overlap.run_id == run_id("report", fire_time(seconds_ago=1))
        busy.runner.stop()  # the buffered firings are dropped, not run, at shutdown


def cancel_one_for_the_next(tmp_path: Path, backend: MemoryBackend) -> tuple[Job, datetime]:
    """Under ``cancel_other``: a firing runs, the next one comes and replaces it, and runs
    to success. Returns the job and the cancelled firing."""
    first, second, _ = three_firings()
    with running_one(tmp_path, backend, first, "cancel_other") as busy:
        busy.runner.dispatch(busy.job, second)
        wait_for("the new firing", lambda: len(busy.gate.ran) == 2)
        busy.opened.set()
        wait_for("it succeeded", lambda: states(backend, "report", second) == [(1, "succeeded")])
    return busy.job, first


def test_cancel_other_stops_the_running_firing_and_runs_the_new_one(tmp_path: Path) -> None:
    backend = MemoryBackend()
    _, first = cancel_one_for_the_next(tmp_path, backend)

    [cancelled] = backend.attempts(run_id("report", first))
    assert (cancelled.state, cancelled.reason) == ("interrupted", "overlap")
    assert cancelled.error == "cancelled: a newer firing came (overlap: cancel_other)"


def test_a_cancelled_firing_is_not_taken_over_as_an_orphan(tmp_path: Path) -> None:
    backend = MemoryBackend()
    job, first = cancel_one_for_the_next(tmp_path, backend)
    standby, standby_events = make_runner(tmp_path, backend, [job])

    standby.firer.fire(job, first, late_ok=True)

    duplicate = standby_events.wait_for("skipped", reason="duplicate")
    assert duplicate.fields["previous"] == "interrupted"
    assert states(backend, "report", first) == [(1, "interrupted")]


def test_cancel_other_stops_a_command_that_ignores_sigterm(tmp_path: Path) -> None:
    backend = MemoryBackend()
    stubborn = CommandTarget(["sh", "-c", "trap '' TERM; sleep 30"], kill_grace=0.3)
    job = make_job("report", stubborn, overlap="cancel_other")
    runner, events = make_runner(tmp_path, backend, [job])
    first, second, _ = three_firings()
    runner.dispatch(job, first)
    events.wait_for("started")
    runner.dispatch(job, second)
    wait_for("the old one killed", lambda: states(backend, "report", first) == [(1, "interrupted")])
    runner.firer.cancel("report")  # the new one: leave nothing running
    wait_for(
        "the new one stopped", lambda: states(backend, "report", second) == [(1, "interrupted")]
    )


def test_allow_runs_firings_side_by_side_with_rising_tokens(tmp_path: Path) -> None:
    backend = MemoryBackend()
    with until_set(threading.Event()) as opened:
        gate = Gate(opened)
        job = make_job("warm", gate, overlap="allow", mode="efficiency")
        runner, _ = make_runner(tmp_path, backend, [job])
        firings = three_firings()
        for when in firings:
            runner.dispatch(job, when)
        wait_for("three at once", lambda: gate.running == 3)
        opened.set()
        wait_for("all done", lambda: {r.state for r in backend.history("warm", 0)} == {"succeeded"})

    rows = sorted(backend.history("warm", 0), key=lambda row: row.scheduled_at)
    assert [row.run_id for row in rows] == [run_id("warm", when) for when in firings]
    tokens = [row.token for row in rows]
    assert len(set(tokens)) == 3, "each firing has a token of its own"
    assert backend.holder("warm") is None


def test_allow_still_runs_each_firing_once_across_replicas(tmp_path: Path) -> None:
    backend = MemoryBackend()
    with until_set(threading.Event()) as opened:
        gate = Gate(opened)
        job = make_job("warm", gate, overlap="allow", mode="efficiency")
        replicas = [make_runner(tmp_path, backend, [job])[0] for _ in range(3)]
        firings = three_firings()
        for when in firings:
            for replica in replicas:
                replica.dispatch(job, when)
        opened.set()
        wait_for("all done", lambda: {r.state for r in backend.history("warm", 0)} == {"succeeded"})
        time.sleep(0.2)

    assert sorted(gate.ran) == sorted(run_id("warm", when) for when in firings)


def test_allow_is_refused_outside_efficiency_mode(tmp_path: Path) -> None:
    from singleton.config import Settings

    settings = Settings.model_validate(
        {"jobs": {"x": {"every": "1s", "command": ["true"], "overlap": "allow"}}}
    )
    with pytest.raises(ConfigError, match=r"jobs\.x\.overlap: 'allow' .* mode efficiency"):
        resolve(settings, tmp_path)
