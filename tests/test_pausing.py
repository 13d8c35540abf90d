"""The cluster-wide pause switch in one process: the switch in shared state, a replica's
view of it, what a paused firing leaves in the ledger, and ``pause_on_failure``. The CLI
and several real replicas are in tests/test_operator_controls.py."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from singleton import pausing
from singleton.backends.base import Attempt
from singleton.backends.memory import MemoryBackend
from singleton.clock import SYSTEM_CLOCK
from singleton.pausing import Pause, PauseWatch, failure_streak
from singleton.schedule import run_id
from tests.firing_support import fire_time, make_job, make_replica, wait_for
from tests.test_runner import every_second, make_runner, running

NOW = datetime(2026, 12, 6, 3, 0, tzinfo=UTC)


def row(run: str, state: str, attempt: int = 1) -> Attempt:
    return Attempt(f"job@{run}", "job", attempt, state, 1, "r1", NOW)


# --- the switch ------------------------------------------------------------------------------


def test_a_pause_is_read_back_with_who_when_why_and_until() -> None:
    backend = MemoryBackend()
    until = NOW + timedelta(hours=2)
    pausing.pause(backend, Pause("compact", "alice@ops", NOW, "disk full", until))

    [found] = pausing.read(backend, NOW).values()

    assert found == Pause("compact", "alice@ops", NOW, "disk full", until)
    assert found.to_json() == {
        "by": "alice@ops",
        "at": "2026-12-06T03:00:00Z",
        "note": "disk full",
        "until": "2026-12-06T05:00:00Z",
    }


def test_a_pause_until_a_time_ends_at_that_time() -> None:
    backend = MemoryBackend()
    pausing.pause(backend, Pause("compact", "alice", NOW, None, NOW + timedelta(minutes=5)))

    assert "compact" in pausing.read(backend, NOW + timedelta(minutes=4))
    assert pausing.read(backend, NOW + timedelta(minutes=5)) == {}


def test_resume_removes_the_pause() -> None:
    backend = MemoryBackend()
    pausing.pause(backend, Pause("compact", "alice", NOW))
    pausing.resume(backend, "compact")

    assert pausing.read(backend, NOW) == {}


def test_an_unreadable_pause_record_is_ignored() -> None:
    backend = MemoryBackend()
    backend.put("paused/compact", "{not json")
    pausing.pause(backend, Pause("report", "alice", NOW))

    assert set(pausing.read(backend, NOW)) == {"report"}


# --- a replica's view ------------------------------------------------------------------------


def test_a_replica_sees_a_pause_at_its_next_firing_without_waiting_for_a_refresh() -> None:
    backend = MemoryBackend()
    watch = PauseWatch(backend, SYSTEM_CLOCK)
    watch.refresh()
    pausing.pause(backend, Pause("compact", "alice", datetime.now(UTC)))

    assert watch.get("compact") is None, "a fresh read is trusted"
    watch._read_at -= pausing.FRESH  # as if FRESH had passed since the last read
    paused = watch.get("compact")
    assert paused is not None and paused.by == "alice"


def test_a_replica_keeps_its_last_read_while_the_coordinator_cannot_be_read() -> None:
    backend = MemoryBackend()
    watch = PauseWatch(backend, SYSTEM_CLOCK)
    pausing.pause(backend, Pause("compact", "alice", datetime.now(UTC)))
    watch.refresh()

    def unreachable(prefix: str) -> dict[str, str]:
        raise ConnectionError("coordinator down")

    backend.scan = unreachable  # type: ignore[method-assign]
    watch._read_at -= pausing.FRESH

    assert watch.get("compact") is not None


def test_a_paused_firing_is_recorded_as_skipped_and_does_not_run() -> None:
    backend = MemoryBackend()
    ran: list[str] = []
    job = make_job("compact", lambda ctx: ran.append(ctx.run_id))
    replica = make_replica(backend)
    replica.firer.pauses = PauseWatch(backend, SYSTEM_CLOCK)
    pausing.pause(backend, Pause("compact", "alice", datetime.now(UTC), "migrating"))
    when = fire_time()

    replica.fire(job, when)

    assert ran == []
    [skipped] = backend.attempts(run_id("compact", when))
    assert (skipped.state, skipped.reason) == ("skipped", "paused")
    event = replica.recorder.wait_for("skipped", reason="paused")
    assert (event.fields["paused_by"], event.fields["note"]) == ("alice", "migrating")


def test_a_resumed_job_runs_at_its_next_firing() -> None:
    backend = MemoryBackend()
    ran: list[str] = []
    job = make_job("compact", lambda ctx: ran.append(ctx.run_id))
    replica = make_replica(backend)
    watch = replica.firer.pauses = PauseWatch(backend, SYSTEM_CLOCK)
    pausing.pause(backend, Pause("compact", "alice", datetime.now(UTC)))
    watch.refresh()
    pausing.resume(backend, "compact")
    watch.refresh()
    when = fire_time()

    replica.fire(job, when)

    assert ran == [run_id("compact", when)]


def test_other_jobs_run_while_one_is_paused() -> None:
    backend = MemoryBackend()
    ran: list[str] = []
    job = make_job("report", lambda ctx: ran.append(ctx.run_id))
    replica = make_replica(backend)
    replica.firer.pauses = PauseWatch(backend, SYSTEM_CLOCK)
    pausing.pause(backend, Pause("compact", "alice", datetime.now(UTC)))

    replica.fire(job, fire_time())

    assert len(ran) == 1


# --- pause_on_failure ------------------------------------------------------------------------


def test_the_failure_streak_counts_the_newest_runs_that_failed_in_a_row() -> None:
    rows = [row("5", "failed"), row("4", "timed_out"), row("3", "failed"), row("2", "succeeded")]
    assert failure_streak(rows) == 3


def test_a_run_counts_by_its_last_attempt() -> None:
    rows = [row("2", "succeeded", attempt=2), row("2", "failed"), row("1", "failed")]
    assert failure_streak(rows) == 0


def test_skipped_firings_do_not_break_or_extend_a_streak() -> None:
    rows = [row("4", "failed"), row("3", "skipped"), row("2", "failed"), row("1", "succeeded")]
    assert failure_streak(rows) == 2


def test_a_run_still_going_ends_the_streak() -> None:
    assert failure_streak([row("3", "running"), row("2", "failed"), row("1", "failed")]) == 0


def test_pause_on_failure_pauses_the_job_after_that_many_failed_runs(tmp_path: Path) -> None:
    backend = MemoryBackend()
    def broken() -> None:
        raise RuntimeError("the report server is down")

    job = every_second("report", broken, pause_on_failure=2)
    runner, events = make_runner(tmp_path, backend, [job])

    with running(runner):
        paused = events.wait_for("paused", timeout=10)
        wait_for("a paused firing", lambda: events.of("skipped"), timeout=5)

    found = pausing.read(backend, datetime.now(UTC))["report"]
    assert found.by == "r1" and paused.fields["by"] == "r1"
    assert found.note == "2 consecutive failed runs (pause_on_failure: 2)"
    states = [r.state for r in backend.history("report", 0)]
    assert states.count("failed") == 2, "no run started after the pause"
    assert "skipped" in states
