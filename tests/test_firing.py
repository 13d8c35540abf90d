"""The policy of one firing (``singleton.firing.Firer``) against real backends.

Two replicas are two ``Firer`` objects with their own replica ids; across "processes" each
has its own ``SqliteBackend`` on one file, in one process they share a ``MemoryBackend``.
Outcomes are read from the ledger and from the events each replica emits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest

from singleton.backends.base import (
    ABANDONED,
    FAILED,
    INTERRUPTED,
    LOST_LEASE,
    TIMED_OUT,
    Backend,
    Claim,
    Lease,
    Outcome,
    Run,
)
from singleton.backends.memory import MemoryBackend
from singleton.backends.sqlite import SqliteBackend
from singleton.clock import SystemClock
from singleton.context import JobContext
from singleton.errors import BackendUnavailable
from singleton.firing import STANDBY_POLL
from singleton.schedule import run_id
from singleton.targets import CommandTarget
from tests.firing_support import (
    LateFirstReply,
    attempts_of,
    fire_time,
    make_job,
    make_replica,
    states,
    steal_sqlite_lock,
    until_set,
    wait_for,
)

SqliteFactory = Callable[[], SqliteBackend]


@pytest.fixture
def sqlite_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


@pytest.fixture
def open_sqlite(sqlite_path: Path) -> Iterator[SqliteFactory]:
    """Opens one SQLite backend per replica on a shared file, as separate processes would."""
    opened: list[SqliteBackend] = []

    def factory() -> SqliteBackend:
        backend = SqliteBackend(f"sqlite:///{sqlite_path}")
        opened.append(backend)
        return backend

    yield factory
    for backend in opened:
        backend.close()


@pytest.fixture(params=["memory", "sqlite"])
def backends(request: pytest.FixtureRequest, open_sqlite: SqliteFactory) -> tuple[Backend, Backend]:
    """Two replicas' handles on one coordinator."""
    if request.param == "memory":
        shared = MemoryBackend()
        return shared, shared
    return open_sqlite(), open_sqlite()


def counting() -> tuple[list[JobContext], Callable[[JobContext], None]]:
    """A job that remembers the context of every run."""
    seen: list[JobContext] = []

    def work(ctx: JobContext) -> None:
        seen.append(ctx)

    return seen, work


def until_lost(ctx: JobContext, limit: float = 5.0) -> bool:
    """What a well-behaved sync job does: work in small steps, stop once ``ctx.lost``."""
    deadline = time.monotonic() + limit
    while not ctx.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    return ctx.lost


def dead_owner(backend: Backend, job: str, at: datetime, ttl: float) -> Lease:
    """An owner that acquired and claimed the firing, then died: it never renews or finishes."""
    got = backend.acquire_and_claim(Run(job, run_id(job, at), at), ttl, "dead-replica:1")
    assert got is not None
    lease, claim = got
    assert claim.attempt is not None and claim.attempt.attempt == 1
    return lease


def previous_attempt(backend: Backend, job: str, at: datetime, state: str) -> int:
    """A firing whose attempt 1 ended ``state`` on another replica; returns its token."""
    run = Run(job, run_id(job, at), at)
    got = backend.acquire_and_claim(run, 5.0, "earlier-replica:1")
    assert got is not None
    lease, _ = got
    assert backend.finish_and_release(run, lease, 1, Outcome(state, "it ended so"))
    return lease.token


# --- a new firing -------------------------------------------------------------------------


def test_a_new_firing_runs_attempt_one_and_records_succeeded_under_its_token(
    backends: tuple[Backend, Backend],
) -> None:
    backend, _ = backends
    seen, work = counting()
    replica = make_replica(backend, "r1")
    at = fire_time()

    replica.fire(make_job("compact", work), at)

    token = replica.recorder.of("acquired")[0].token
    [ctx] = seen
    assert (ctx.run_id, ctx.attempt, ctx.token, ctx.replica_id) == (
        run_id("compact", at),
        1,
        token,
        "r1",
    )
    [row] = attempts_of(backend, "compact", at)
    assert (row.attempt, row.state, row.token, row.replica) == (1, "succeeded", token, "r1")
    assert row.finished_at is not None and row.error is None


def test_after_a_firing_another_replica_can_acquire_the_lock_at_once(
    backends: tuple[Backend, Backend],
) -> None:
    backend, other = backends
    replica = make_replica(backend, "r1")
    replica.fire(make_job("compact", lambda: None), fire_time())

    token = replica.recorder.of("released")[0].token
    assert token is not None
    lease = other.try_acquire("compact", 1.0, "r2:1")
    assert lease is not None
    assert lease.token > token
    other.release(lease)


def test_a_firing_that_already_succeeded_is_not_rerun_by_another_replica(
    backends: tuple[Backend, Backend],
) -> None:
    first, second = backends
    seen, work = counting()
    job = make_job("compact", work)
    r1, r2 = make_replica(first, "r1"), make_replica(second, "r2")
    at = fire_time()

    r1.fire(job, at)
    r2.fire(job, at)

    assert [ctx.replica_id for ctx in seen] == ["r1"]
    assert states(first, "compact", at) == [(1, "succeeded")]
    skipped = r2.recorder.wait_for("skipped")
    assert skipped.fields["reason"] == "duplicate"
    assert skipped.fields["previous"] == "succeeded"
    assert "started" not in r2.recorder.kinds()


def test_a_dedup_releases_the_lock(backends: tuple[Backend, Backend]) -> None:
    first, second = backends
    job = make_job("compact", lambda: None)
    at = fire_time()
    make_replica(first, "r1").fire(job, at)
    make_replica(second, "r2").fire(job, at)

    assert second.holder("compact") is None


# --- misfires --------------------------------------------------------------------------------


def test_a_firing_older_than_misfire_grace_is_recorded_misfired_and_not_run(
    backends: tuple[Backend, Backend],
) -> None:
    backend, _ = backends
    seen, work = counting()
    replica = make_replica(backend)
    at = fire_time(seconds_ago=5.0)

    replica.fire(make_job("compact", work, misfire_grace=1.0), at)

    assert seen == []
    [row] = attempts_of(backend, "compact", at)
    assert (row.attempt, row.state, row.reason, row.token) == (1, "skipped", "misfired", None)
    event = replica.recorder.wait_for("skipped", reason="misfired")
    assert event.fields["recorded"] is True
    assert "acquired" not in replica.recorder.kinds()


def test_two_replicas_record_a_misfired_firing_once(backends: tuple[Backend, Backend]) -> None:
    first, second = backends
    job = make_job("compact", lambda: None, misfire_grace=1.0)
    r1, r2 = make_replica(first, "r1"), make_replica(second, "r2")
    at = fire_time(seconds_ago=5.0)

    r1.fire(job, at)
    r2.fire(job, at)

    assert states(first, "compact", at) == [(1, "skipped")]
    assert r1.recorder.wait_for("skipped", reason="misfired").fields["recorded"] is True
    assert r2.recorder.wait_for("skipped", reason="misfired").fields["recorded"] is False


# --- a busy lock -----------------------------------------------------------------------------


def test_efficiency_mode_skips_a_busy_lock_at_once_and_records_nothing(
    backends: tuple[Backend, Backend],
) -> None:
    first, second = backends
    held = first.try_acquire("refresh", 5.0, "elsewhere:1")
    assert held is not None
    seen, work = counting()
    replica = make_replica(second, "r2")
    at = fire_time()

    started = time.monotonic()
    replica.fire(make_job("refresh", work, mode="efficiency"), at)
    took = time.monotonic() - started

    assert took < STANDBY_POLL / 2
    assert seen == []
    assert second.attempts(run_id("refresh", at)) == []
    skipped = replica.recorder.wait_for("skipped")
    assert (skipped.fields["reason"], skipped.fields["recorded"]) == ("busy", False)
    assert "standby" not in replica.recorder.kinds()
    first.release(held)


def test_singleton_mode_loser_stands_by_while_the_owner_runs_then_sees_its_success(
    backends: tuple[Backend, Backend],
) -> None:
    first, second = backends
    seen: list[str] = []

    def work(ctx: JobContext) -> None:
        seen.append(ctx.replica_id)
        proceed.wait(5)

    job = make_job("compact", work)
    r1, r2 = make_replica(first, "r1"), make_replica(second, "r2")
    at = fire_time()
    with until_set(threading.Event()) as proceed:
        owner = r1.fire_in_background(job, at)
        r1.recorder.wait_for("started")
        loser = r2.fire_in_background(job, at)
        r2.recorder.wait_for("standby")
        time.sleep(0.1)
        assert not loser.done, "the loser must stand by, not give up"
        proceed.set()
        owner.join()
        loser.join()

    assert seen == ["r1"]
    assert states(first, "compact", at) == [(1, "succeeded")]
    assert r2.recorder.wait_for("skipped").fields["reason"] == "duplicate"


# --- takeover --------------------------------------------------------------------------------


def test_a_standby_takes_over_from_a_dead_owner_under_a_higher_token(
    backends: tuple[Backend, Backend],
) -> None:
    first, second = backends
    seen, work = counting()
    at = fire_time()
    dead = dead_owner(first, "compact", at, ttl=0.4)
    replica = make_replica(second, "r2")

    replica.fire(make_job("compact", work), at)

    rows = attempts_of(second, "compact", at)
    assert [(row.attempt, row.state) for row in rows] == [(1, "abandoned"), (2, "succeeded")]
    assert rows[0].token == dead.token
    assert rows[1].token is not None and rows[1].token > dead.token
    assert [ctx.attempt for ctx in seen] == [2]
    taken = replica.recorder.wait_for("taken_over")
    assert (taken.fields["previous"], taken.fields["previous_token"]) == ("running", dead.token)


def test_a_takeover_is_not_bounded_by_max_attempts(backends: tuple[Backend, Backend]) -> None:
    first, second = backends
    seen, work = counting()
    at = fire_time()
    dead_owner(first, "compact", at, ttl=0.3)

    make_replica(second, "r2").fire(make_job("compact", work, max_attempts=1), at)

    assert states(second, "compact", at) == [(1, "abandoned"), (2, "succeeded")]
    assert len(seen) == 1


def test_on_orphan_skip_closes_the_orphan_and_does_not_run_the_job(
    backends: tuple[Backend, Backend],
) -> None:
    first, second = backends
    seen, work = counting()
    at = fire_time()
    dead_owner(first, "compact", at, ttl=0.3)
    replica = make_replica(second, "r2")

    replica.fire(make_job("compact", work, on_orphan="skip"), at)

    assert seen == []
    assert states(second, "compact", at) == [(1, "abandoned")]
    assert replica.recorder.wait_for("taken_over").fields["on_orphan"] == "skip"
    assert second.holder("compact") is None


def test_a_grant_read_after_its_deadline_never_starts_the_job_and_the_firing_runs_once(
    sqlite_path: Path,
) -> None:
    backend = LateFirstReply(f"sqlite:///{sqlite_path}", late=1.6)
    seen, work = counting()
    at = fire_time()
    replica = make_replica(backend, "r1")
    try:
        replica.fire(make_job("compact", work, lock_ttl=1.5), at)

        assert [ctx.attempt for ctx in seen] == [2]
        assert states(backend, "compact", at) == [(1, "abandoned"), (2, "succeeded")]
        [lost] = replica.recorder.of("lost")
        assert lost.fields["reason"] == "deadline passed before the grant arrived"
    finally:
        backend.close()


class SlowTakeoverClaim(SqliteBackend):
    """A takeover's claim (attempt 2 onwards) answers only after the lease's deadline, and
    the coordinator gave the lock to someone else meanwhile: the owner was paused between
    acquiring and starting the job."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"sqlite:///{path}")
        self.path = path

    def claim(self, run: Run, lease: Lease, *, seen: int = 0, start: bool = True) -> Claim:
        found = super().claim(run, lease, seen=seen, start=start)
        if seen and start:
            steal_sqlite_lock(self.path, run.job)
            time.sleep(max(0.0, lease.deadline - time.monotonic()) + 0.05)
        return found


def test_a_lease_past_its_deadline_before_the_job_starts_never_starts_it(
    sqlite_path: Path, open_sqlite: SqliteFactory
) -> None:
    at = fire_time()
    dead_owner(open_sqlite(), "compact", at, ttl=0.3)
    backend = SlowTakeoverClaim(sqlite_path)
    seen, work = counting()
    replica = make_replica(backend, "r2")
    try:
        wait_for("the dead owner's lease to run out", lambda: backend.holder("compact") is None)
        replica.fire(make_job("compact", work, lock_ttl=1.0), at)

        assert seen == []
        assert attempts_of(backend, "compact", at)[-1].error == "never started: lost_lease"
        assert states(backend, "compact", at) == [(1, "abandoned"), (2, "lost_lease")]
    finally:
        backend.close()


def test_the_first_owner_in_a_process_abandons_an_earlier_firing_left_running(
    backends: tuple[Backend, Backend],
) -> None:
    """A lone replica killed mid-run: nobody stood by to take that firing over, so the
    restarted replica closes it when it first holds the job's lock."""
    first, second = backends
    killed, now = fire_time(60), fire_time()
    lease = dead_owner(first, "compact", killed, ttl=0.3)
    wait_for("the dead owner's lease to run out", lambda: second.holder("compact") is None)
    replica = make_replica(second, "r2")

    replica.fire(make_job("compact", lambda: None), now)

    assert states(second, "compact", killed) == [(1, "abandoned")]
    assert states(second, "compact", now) == [(1, "succeeded")]
    closed = replica.recorder.wait_for("abandoned")
    assert (closed.run_id, closed.fields["previous_token"]) == (
        run_id("compact", killed),
        lease.token,
    )


def test_an_earlier_firing_left_running_is_looked_for_once_per_process(
    backends: tuple[Backend, Backend],
) -> None:
    first, second = backends
    replica = make_replica(second, "r2")
    replica.fire(make_job("compact", lambda: None), fire_time(3))
    killed = fire_time(60)
    dead_owner(first, "compact", killed, ttl=0.3)
    wait_for("the dead owner's lease to run out", lambda: second.holder("compact") is None)

    replica.fire(make_job("compact", lambda: None), fire_time())

    assert states(second, "compact", killed) == [(1, "running")]


def test_overlap_allow_leaves_earlier_running_firings_alone(
    backends: tuple[Backend, Backend],
) -> None:
    """Under ``allow`` a running attempt holds no lock by design, so a lower token proves
    nothing about its owner."""
    first, second = backends
    earlier = fire_time(60)
    dead_owner(first, "compact", earlier, ttl=0.3)
    wait_for("the first lease to run out", lambda: second.holder("compact") is None)
    job = make_job("compact", lambda: None, mode="efficiency", overlap="allow")

    make_replica(second, "r2").fire(job, fire_time())

    assert states(second, "compact", earlier) == [(1, "running")]


@pytest.mark.parametrize("state", [INTERRUPTED, ABANDONED])
def test_an_attempt_that_did_not_end_on_its_own_is_rerun_whatever_max_attempts(
    backends: tuple[Backend, Backend], state: str
) -> None:
    first, second = backends
    seen, work = counting()
    at = fire_time()
    previous_attempt(first, "compact", at, state)

    make_replica(second, "r2").fire(make_job("compact", work, max_attempts=1), at)

    assert states(second, "compact", at) == [(1, state), (2, "succeeded")]
    assert [ctx.attempt for ctx in seen] == [2]


# --- standing by past the grace --------------------------------------------------------------


def test_a_standby_past_the_grace_keeps_watching_a_running_firing_and_takes_over(
    backends: tuple[Backend, Backend],
) -> None:
    first, second = backends
    seen, work = counting()
    at = fire_time()
    dead_owner(first, "compact", at, ttl=1.0)
    replica = make_replica(second, "r2")

    started = time.monotonic()
    replica.fire(make_job("compact", work, misfire_grace=0.3), at)
    took = time.monotonic() - started

    assert took > 0.5, "it took over only once the owner's lease ran out, after the grace"
    assert states(second, "compact", at) == [(1, "abandoned"), (2, "succeeded")]
    assert len(seen) == 1


def test_a_standby_past_the_grace_records_overlap_when_the_firing_never_started(
    backends: tuple[Backend, Backend],
) -> None:
    first, second = backends
    held = first.try_acquire("compact", 5.0, "previous-firing:1")
    assert held is not None
    seen, work = counting()
    replica = make_replica(second, "r2")
    at = fire_time()

    started = time.monotonic()
    replica.fire(make_job("compact", work, misfire_grace=0.3), at)
    took = time.monotonic() - started

    assert 0.25 < took < 1.5
    assert seen == []
    [row] = attempts_of(second, "compact", at)
    assert (row.state, row.reason) == ("skipped", "overlap")
    assert replica.recorder.wait_for("skipped", reason="overlap").fields["recorded"] is True
    first.release(held)


def test_a_standby_past_the_grace_leaves_a_firing_that_ended_elsewhere(
    backends: tuple[Backend, Backend],
) -> None:
    first, second = backends
    at = fire_time()
    run = Run("compact", run_id("compact", at), at)
    got = first.acquire_and_claim(run, 5.0, "owner-elsewhere:1")
    assert got is not None
    lease, _ = got
    seen, work = counting()
    replica = make_replica(second, "r2")
    job = make_job("compact", work, misfire_grace=0.2, lock_ttl=0.5)
    standby = replica.fire_in_background(job, at)
    replica.recorder.wait_for("standby")
    time.sleep(0.3)
    # Past the grace; the owner finishes but keeps the lock a while (lock_at_least_for).
    assert first.finish_and_release(run, lease, 1, Outcome("succeeded"), keep_for=5.0)

    standby.join(3.0)

    assert seen == []
    assert states(second, "compact", at) == [(1, "succeeded")]


# --- retries ---------------------------------------------------------------------------------


def flaky(failures: int) -> tuple[list[JobContext], Callable[[JobContext], None]]:
    """A job that raises on its first ``failures`` runs."""
    seen: list[JobContext] = []

    def work(ctx: JobContext) -> None:
        seen.append(ctx)
        if len(seen) <= failures:
            raise RuntimeError(f"failure {len(seen)}")

    return seen, work


def test_a_failing_job_is_retried_in_place_under_one_token_until_it_succeeds() -> None:
    backend = MemoryBackend()
    seen, work = flaky(failures=2)
    replica = make_replica(backend)
    at = fire_time()

    replica.fire(make_job("flaky", work, max_attempts=3, retry_backoff=0.05), at)

    rows = attempts_of(backend, "flaky", at)
    assert [(row.attempt, row.state) for row in rows] == [
        (1, "failed"),
        (2, "failed"),
        (3, "succeeded"),
    ]
    assert rows[0].error == "RuntimeError: failure 1"
    assert len({row.token for row in rows}) == 1
    assert [ctx.attempt for ctx in seen] == [1, 2, 3]
    assert len(replica.recorder.of("acquired")) == 1


def test_a_retry_waits_retry_backoff_after_the_failure() -> None:
    backend = MemoryBackend()
    _, work = flaky(failures=1)
    replica = make_replica(backend)

    replica.fire(make_job("flaky", work, max_attempts=2, retry_backoff=0.3), fire_time())

    events = replica.recorder
    failed_at = events.time_of("failed")
    second_start = [
        at
        for event, at in zip(events.events, events.times, strict=True)
        if event.kind == "started" and event.fields["attempt"] == 2
    ]
    assert second_start and second_start[0] - failed_at >= 0.29


def test_a_failing_job_with_max_attempts_one_is_not_retried() -> None:
    backend = MemoryBackend()
    seen, work = flaky(failures=5)
    at = fire_time()

    make_replica(backend).fire(make_job("flaky", work, max_attempts=1), at)

    assert states(backend, "flaky", at) == [(1, "failed")]
    assert len(seen) == 1


def test_a_retry_gives_up_once_attempts_are_exhausted() -> None:
    backend = MemoryBackend()
    seen, work = flaky(failures=5)
    at = fire_time()

    make_replica(backend).fire(make_job("flaky", work, max_attempts=2, retry_backoff=0.01), at)

    assert states(backend, "flaky", at) == [(1, "failed"), (2, "failed")]
    assert len(seen) == 2


@pytest.mark.parametrize("state", [FAILED, TIMED_OUT, LOST_LEASE])
def test_a_later_replica_retries_an_ended_attempt_while_attempts_remain(
    backends: tuple[Backend, Backend], state: str
) -> None:
    first, second = backends
    seen, work = counting()
    at = fire_time()
    earlier = previous_attempt(first, "compact", at, state)

    make_replica(second, "r2").fire(make_job("compact", work, max_attempts=2), at)

    rows = attempts_of(second, "compact", at)
    assert [(row.attempt, row.state) for row in rows] == [(1, state), (2, "succeeded")]
    assert rows[1].token is not None and rows[1].token > earlier
    assert [ctx.attempt for ctx in seen] == [2]


def test_a_later_replica_skips_a_failed_firing_with_no_attempts_left(
    backends: tuple[Backend, Backend],
) -> None:
    first, second = backends
    seen, work = counting()
    at = fire_time()
    previous_attempt(first, "compact", at, FAILED)
    replica = make_replica(second, "r2")

    replica.fire(make_job("compact", work, max_attempts=1), at)

    assert seen == []
    assert states(second, "compact", at) == [(1, "failed")]
    assert replica.recorder.wait_for("skipped").fields["reason"] == "attempts_exhausted"
    assert second.holder("compact") is None


# --- timeout ---------------------------------------------------------------------------------


def test_a_call_that_exceeds_its_timeout_is_stopped_and_ends_timed_out() -> None:
    backend = MemoryBackend()
    saw_stop: list[bool] = []
    at = fire_time()
    job = make_job("slow", lambda ctx: saw_stop.append(until_lost(ctx)), timeout=0.2)

    started = time.monotonic()
    make_replica(backend).fire(job, at)

    assert time.monotonic() - started < 1.0
    assert saw_stop == [True]
    [row] = attempts_of(backend, "slow", at)
    assert (row.state, row.error) == ("timed_out", "timed_out")


def test_a_timed_out_attempt_is_retried_in_place_and_the_retry_is_not_stopped() -> None:
    backend = MemoryBackend()
    calls: list[int] = []

    def slow_then_quick(ctx: JobContext) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            until_lost(ctx)

    at = fire_time()
    job = make_job("slow", slow_then_quick, timeout=0.2, max_attempts=3, retry_backoff=0.05)
    make_replica(backend).fire(job, at)

    rows = attempts_of(backend, "slow", at)
    assert [(row.attempt, row.state) for row in rows] == [(1, "timed_out"), (2, "succeeded")]
    assert calls == [1, 2]
    assert len({row.token for row in rows}) == 1


def test_a_command_that_exceeds_its_timeout_is_killed_and_ends_timed_out(tmp_path: Path) -> None:
    backend = MemoryBackend()
    pidfile = tmp_path / "pid"
    command = CommandTarget(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], kill_grace=1.0)
    at = fire_time()

    started = time.monotonic()
    make_replica(backend).fire(make_job("slow", command, timeout=0.3), at)

    assert time.monotonic() - started < 2.0
    [row] = attempts_of(backend, "slow", at)
    assert row.state == "timed_out"
    assert row.error is not None and row.error.startswith("killed by SIGTERM")
    pid = int(pidfile.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# --- a lost lease ----------------------------------------------------------------------------


def test_a_stolen_lease_sets_ctx_lost_for_a_sync_call_and_ends_lost_lease(
    sqlite_path: Path, open_sqlite: SqliteFactory
) -> None:
    backend, other = open_sqlite(), open_sqlite()
    saw_lost: list[bool] = []
    replica = make_replica(backend)
    at = fire_time()
    job = make_job("shard", lambda ctx: saw_lost.append(until_lost(ctx)), lock_ttl=0.6)

    firing = replica.fire_in_background(job, at)
    replica.recorder.wait_for("started")
    steal_sqlite_lock(sqlite_path, "shard")
    firing.join()

    assert saw_lost == [True]
    assert states(backend, "shard", at) == [(1, "lost_lease")]
    assert replica.recorder.wait_for("lost").fields["reason"].startswith("renewal refused")
    holder = other.holder("shard")
    assert holder is not None and holder.owner == "thief", "the thief's lock must stay"


def test_a_stolen_lease_cancels_an_async_call(
    sqlite_path: Path, open_sqlite: SqliteFactory
) -> None:
    backend = open_sqlite()
    finished: list[str] = []

    async def work(ctx: JobContext) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            finished.append("cancelled")
            raise

    replica = make_replica(backend)
    at = fire_time()
    firing = replica.fire_in_background(make_job("shard", work, lock_ttl=0.6), at)
    replica.recorder.wait_for("started")
    steal_sqlite_lock(sqlite_path, "shard")

    assert firing.join() < 2.0
    assert finished == ["cancelled"]
    [row] = attempts_of(backend, "shard", at)
    assert (row.state, row.error) == ("lost_lease", "cancelled")


def test_a_stolen_lease_sigterms_a_command(sqlite_path: Path, open_sqlite: SqliteFactory) -> None:
    backend = open_sqlite()
    replica = make_replica(backend)
    at = fire_time()
    command = CommandTarget(["sleep", "30"], kill_grace=2.0)
    firing = replica.fire_in_background(make_job("shard", command, lock_ttl=0.6), at)
    replica.recorder.wait_for("started")
    steal_sqlite_lock(sqlite_path, "shard")

    assert firing.join() < 2.0
    [row] = attempts_of(backend, "shard", at)
    assert row.state == "lost_lease"
    assert row.error == "killed by SIGTERM"


class UnreachableOnRenewal(MemoryBackend):
    """A coordinator that grants the lease, then cannot be reached for any renewal."""

    def renew(self, lease: Lease) -> Lease:
        raise BackendUnavailable("connection refused")


def test_a_coordinator_unreachable_until_the_deadline_ends_the_attempt_lost_lease() -> None:
    backend = UnreachableOnRenewal()
    saw_lost: list[bool] = []
    replica = make_replica(backend)
    at = fire_time()
    job = make_job("shard", lambda ctx: saw_lost.append(until_lost(ctx)), lock_ttl=0.3)

    started = time.monotonic()
    replica.fire(job, at)

    assert saw_lost == [True]
    assert time.monotonic() - started >= 0.3 * 0.98
    assert states(backend, "shard", at) == [(1, "lost_lease")]
    assert replica.recorder.wait_for("lost").fields["reason"] == "deadline passed"
    assert replica.recorder.of("renewal_failed"), "each failed renewal is reported"


def test_a_stale_owner_cannot_record_its_outcome_once_the_thief_claimed_the_firing(
    sqlite_path: Path, open_sqlite: SqliteFactory
) -> None:
    backend, thief_side = open_sqlite(), open_sqlite()
    replica = make_replica(backend)
    at = fire_time()
    run = Run("shard", run_id("shard", at), at)

    proceed = threading.Event()

    def work(ctx: JobContext) -> None:
        until_lost(ctx)
        proceed.wait(5)

    with until_set(proceed):
        firing = replica.fire_in_background(make_job("shard", work, lock_ttl=0.6), at)
        replica.recorder.wait_for("started")
        token = steal_sqlite_lock(sqlite_path, "shard", thief="thief:1")
        thief = Lease("shard", "thief:1", token, 60.0, time.monotonic() + 60)
        claim = thief_side.claim(run, thief, seen=1)
        assert claim.attempt is not None and claim.attempt.attempt == 2
        replica.recorder.wait_for("lost")
        proceed.set()
        firing.join()

    rows = attempts_of(backend, "shard", at)
    assert [(row.attempt, row.state, row.token) for row in rows] == [
        (1, "abandoned", token - 1),
        (2, "running", token),
    ]
    refused = replica.recorder.wait_for("finish_refused")
    assert (refused.token, refused.fields["state"]) == (token - 1, "lost_lease")


# --- the lease while the job runs ------------------------------------------------------------


def test_the_lease_keeper_holds_the_lock_through_a_job_three_times_its_ttl(
    open_sqlite: SqliteFactory,
) -> None:
    backend, other = open_sqlite(), open_sqlite()
    ttl = 0.4
    worked = threading.Event()

    def work(ctx: JobContext) -> None:
        end = time.monotonic() + 3 * ttl
        while time.monotonic() < end:
            ctx.check()
            time.sleep(0.02)
        worked.set()

    replica = make_replica(backend)
    at = fire_time()
    firing = replica.fire_in_background(make_job("long", work, lock_ttl=ttl), at)
    replica.recorder.wait_for("started")
    refused = 0
    while True:
        got = other.try_acquire("long", ttl, "other:1")
        if worked.is_set():  # this try may have raced the release at the end: not evidence
            break
        assert got is None, f"another replica acquired {refused * 0.05:.2f}s into the job"
        refused += 1
        time.sleep(0.05)
    firing.join()

    assert refused > 10
    assert states(backend, "long", at) == [(1, "succeeded")]
    assert "lost" not in replica.recorder.kinds()
    assert "renewal_failed" not in replica.recorder.kinds()


def test_lock_at_least_for_keeps_the_lock_after_a_quick_job_then_frees_it(
    backends: tuple[Backend, Backend],
) -> None:
    backend, other = backends
    replica = make_replica(backend)
    replica.fire(make_job("quick", lambda: None, lock_at_least_for=0.6), fire_time())
    acquired_at = replica.recorder.time_of("acquired")

    assert other.try_acquire("quick", 1.0, "other:1") is None
    lease = wait_for("the lock to free", lambda: other.try_acquire("quick", 1.0, "other:1"))
    held_for = time.monotonic() - acquired_at

    assert 0.55 <= held_for < 1.2
    other.release(lease)


def test_lock_at_least_for_does_not_hold_the_lock_after_a_longer_job(
    backends: tuple[Backend, Backend],
) -> None:
    backend, other = backends
    job = make_job("slow", lambda: time.sleep(0.3), lock_at_least_for=0.2)
    make_replica(backend).fire(job, fire_time())

    lease = other.try_acquire("slow", 1.0, "other:1")
    assert lease is not None
    other.release(lease)


# --- jitter ----------------------------------------------------------------------------------


class RecordingClock(SystemClock):
    """The system clock, remembering every wait asked for by the thread that fires."""

    def __init__(self) -> None:
        self.thread = threading.current_thread()
        self.waits: list[float] = []
        self.waiting = threading.Event()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if threading.current_thread() is self.thread:
            self.waits.append(timeout)
            self.waiting.set()
        return super().wait(event, timeout)


def test_jitter_delays_the_start_by_at_most_jitter() -> None:
    backend = MemoryBackend()
    clock = RecordingClock()
    replica = make_replica(backend, clock=clock)
    job = make_job("spread", lambda: None, jitter=0.3)

    called = []
    for seconds_ago in (2.0, 1.0, 0.0):
        called.append(time.monotonic())
        replica.fire(job, fire_time(seconds_ago))
    acquired = replica.recorder.times_of("acquired")
    delays = [got - asked for got, asked in zip(acquired, called, strict=True)]

    assert len(clock.waits) == 3
    assert all(0 < wait <= 0.3 for wait in clock.waits)
    assert all(delay < 0.3 + 0.1 for delay in delays)
    assert [row.state for row in backend.history("spread", 0)] == ["succeeded"] * 3


def test_a_stop_during_jitter_runs_nothing() -> None:
    backend = MemoryBackend()
    seen, work = counting()
    clock = RecordingClock()
    replica = make_replica(backend, clock=clock)
    at = fire_time()

    def stop_once_waiting() -> None:
        if clock.waiting.wait(5):
            replica.stopping.set()

    threading.Thread(target=stop_once_waiting, daemon=True).start()

    started = time.monotonic()
    replica.fire(make_job("spread", work, jitter=60.0, lock_ttl=120.0), at)

    assert time.monotonic() - started < 1.0
    assert seen == []
    assert backend.attempts(run_id("spread", at)) == []


# --- tokens never go backwards ---------------------------------------------------------------


def test_a_token_regression_is_refused_repaired_and_the_firing_runs_above_the_highest() -> None:
    seen, work = counting()
    job = make_job("compact", work)
    before = MemoryBackend()
    before.evict("compact", 99)
    replica = make_replica(before)
    replica.fire(job, fire_time(seconds_ago=1.0))
    assert [ctx.token for ctx in seen] == [100]

    # The coordinator restarts without its data: a new backend whose counter starts again.
    after = MemoryBackend()
    replica.firer.backend = after
    at = fire_time()
    replica.fire(job, at)

    assert [ctx.token for ctx in seen] == [100, 101], "never run under the regressed token"
    regression = replica.recorder.wait_for("token_regression")
    assert (regression.token, regression.fields["highest"]) == (1, 100)
    rows = attempts_of(after, "compact", at)
    assert [(row.attempt, row.state, row.token) for row in rows] == [
        (1, "abandoned", 1),
        (2, "succeeded", 101),
    ]
    assert after.evict("compact", 0) >= 101, "the counter was raised past the highest"


def test_the_attempt_voided_by_a_regression_runs_even_with_on_orphan_skip() -> None:
    seen, work = counting()
    job = make_job("compact", work, on_orphan="skip")
    replica = make_replica(MemoryBackend())
    replica.firer.tokens.observe("compact", 100)

    at = fire_time()
    replica.fire(job, at)

    assert [ctx.token for ctx in seen] == [101]
    assert replica.recorder.of("taken_over") == []
    rows = attempts_of(replica.firer.backend, "compact", at)
    assert [(row.attempt, row.state) for row in rows] == [(1, "abandoned"), (2, "succeeded")]


def test_a_token_below_the_ledgers_record_is_a_regression_for_a_replica_that_knows_nothing(
    sqlite_path: Path, open_sqlite: SqliteFactory
) -> None:
    backend = open_sqlite()
    at = fire_time()
    backend.evict("compact", 49)
    earlier = previous_attempt(backend, "compact", at, FAILED)
    assert earlier == 50
    # The lock table loses its counter; the ledger keeps its record.
    with contextlib.closing(sqlite3.connect(sqlite_path, isolation_level=None)) as conn:
        conn.execute("UPDATE singleton_locks SET token = 0 WHERE name = 'compact'")
    seen, work = counting()
    replica = make_replica(backend, "fresh")

    replica.fire(make_job("compact", work, max_attempts=2), at)

    assert replica.recorder.wait_for("token_regression").fields["highest"] == 50
    rows = attempts_of(backend, "compact", at)
    assert [(row.attempt, row.state) for row in rows] == [(1, "failed"), (2, "succeeded")]
    assert rows[1].token is not None and rows[1].token > 50
    assert [ctx.token for ctx in seen] == [rows[1].token]


# --- what a job is told ----------------------------------------------------------------------


def test_a_command_gets_its_firing_in_the_environment() -> None:
    backend = MemoryBackend()
    script = (
        "import os; print(*(os.environ['SINGLETON_' + k] for k in"
        " ('JOB', 'RUN_ID', 'ATTEMPT', 'FENCING_TOKEN', 'REPLICA_ID')))"
    )
    replica = make_replica(backend, "r7")
    at = fire_time()

    replica.fire(make_job("env", CommandTarget([sys.executable, "-c", script])), at)

    [row] = attempts_of(backend, "env", at)
    output = replica.recorder.wait_for("succeeded").fields["output"]
    assert output == f"env {run_id('env', at)} 1 {row.token} r7"


def test_the_replica_owns_the_job_only_while_its_firing_runs() -> None:
    backend = MemoryBackend()
    replica = make_replica(backend)
    with until_set(threading.Event()) as proceed:
        firing = replica.fire_in_background(
            make_job("compact", lambda: proceed.wait(5)), fire_time()
        )
        replica.recorder.wait_for("started")
        assert replica.firer.running("compact")
        proceed.set()
        firing.join()
    assert not replica.firer.running("compact")
