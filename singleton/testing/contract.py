"""The backend contract, as tests every backend must pass against a real coordinator.

Subclass :class:`BackendContract` in a test module and provide one fixture,
``backend_factory``: a callable that opens a *new* connection to the same coordinator each
time it is called (two connections stand for two replicas). Timing uses real short TTLs,
because the server, not the client, owns expiry in most backends. Set ``ttl`` on the
subclass when the backend has a minimum lease (etcd: 2 s).

Cases follow ShedLock's ``AbstractLockProviderIntegrationTest`` (second acquire refused,
independent names, relock after release, expiry frees, an 8-thread counter fuzz) plus what
fencing and the ledger need.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from singleton.backends.base import (
    ABANDONED,
    FAILED,
    INTERRUPTED,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    Backend,
    Lease,
    Outcome,
    Run,
    new_owner,
)
from singleton.errors import LeaseLost

BackendFactory = Callable[[], Backend]


def make_run(job: str, scheduled_at: datetime | None = None) -> Run:
    """A run of ``job`` at ``scheduled_at`` (default a fixed instant), with its run ID."""
    when = scheduled_at or datetime(2026, 12, 1, 1, 30, tzinfo=UTC)
    return Run(job, f"{job}@{when:%Y-%m-%dT%H:%M:%SZ}", when)


class BackendContract:
    """Every backend's obligations. A subclass supplies the ``backend_factory`` fixture."""

    #: A lease long enough not to expire during a test step.
    ttl: float = 5.0
    #: A lease short enough to wait out; at least the backend's minimum TTL.
    short_ttl: float = 0.3

    @pytest.fixture
    def backend(self, backend_factory: BackendFactory) -> Iterator[Backend]:
        backend = backend_factory()
        yield backend
        backend.close()

    @pytest.fixture
    def other(self, backend_factory: BackendFactory) -> Iterator[Backend]:
        backend = backend_factory()
        yield backend
        backend.close()

    @pytest.fixture
    def name(self) -> str:
        return f"job-{uuid.uuid4().hex[:12]}"

    def acquire(self, backend: Backend, name: str, ttl: float | None = None) -> Lease:
        lease = backend.try_acquire(name, ttl or self.ttl, new_owner("contract"))
        assert lease is not None, f"{name} should have been free"
        return lease

    def wait_out(self, lease: Lease) -> None:
        time.sleep(lease.ttl + 0.1)

    def orphaned(self, backend: Backend, other: Backend, name: str) -> tuple[Run, Lease, Lease]:
        """A firing claimed through ``backend`` whose lease then ran out (a pause, a
        partition) while ``other`` took the lock: the run, the stale lease, the live one."""
        run = make_run(name)
        stale = self.acquire(backend, name, self.short_ttl)
        backend.claim(run, stale)
        self.wait_out(stale)
        return run, stale, self.acquire(other, name)

    # -- the lock ---------------------------------------------------------------------------

    def test_second_acquire_is_refused(self, backend: Backend, other: Backend, name: str) -> None:
        self.acquire(backend, name)
        assert other.try_acquire(name, self.ttl, new_owner("b")) is None

    def test_independent_names_do_not_contend(self, backend: Backend, name: str) -> None:
        self.acquire(backend, name)
        assert backend.try_acquire(name + "-2", self.ttl, new_owner("b")) is not None

    def test_relock_after_release(self, backend: Backend, other: Backend, name: str) -> None:
        backend.release(self.acquire(backend, name))
        assert other.try_acquire(name, self.ttl, new_owner("b")) is not None

    def test_expiry_frees_the_lock(self, backend: Backend, other: Backend, name: str) -> None:
        lease = self.acquire(backend, name, self.short_ttl)
        self.wait_out(lease)
        assert other.try_acquire(name, self.ttl, new_owner("b")) is not None

    def test_deadline_is_before_the_server_expiry(self, backend: Backend, name: str) -> None:
        before = time.monotonic()
        lease = self.acquire(backend, name)
        assert lease.deadline < before + self.ttl

    def test_renew_extends_the_lease(self, backend: Backend, other: Backend, name: str) -> None:
        lease = self.acquire(backend, name, self.short_ttl)
        for _ in range(3):
            time.sleep(self.short_ttl / 2)
            lease = backend.renew(lease)
        assert other.try_acquire(name, self.ttl, new_owner("b")) is None

    def test_renew_returns_a_later_deadline(self, backend: Backend, name: str) -> None:
        lease = self.acquire(backend, name)
        time.sleep(0.01)
        assert backend.renew(lease).deadline > lease.deadline

    def test_renew_after_expiry_raises_lease_lost(self, backend: Backend, name: str) -> None:
        lease = self.acquire(backend, name, self.short_ttl)
        self.wait_out(lease)
        with pytest.raises(LeaseLost):
            backend.renew(lease)

    def test_renew_after_takeover_raises_lease_lost(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        lease = self.acquire(backend, name, self.short_ttl)
        self.wait_out(lease)
        self.acquire(other, name)
        with pytest.raises(LeaseLost):
            backend.renew(lease)

    def test_stale_lease_cannot_release(self, backend: Backend, other: Backend, name: str) -> None:
        stale = self.acquire(backend, name, self.short_ttl)
        self.wait_out(stale)
        live = self.acquire(other, name)
        backend.release(stale)
        holder = other.holder(name)
        assert holder is not None and holder.token == live.token

    def test_release_of_a_released_lease_is_quiet(self, backend: Backend, name: str) -> None:
        lease = self.acquire(backend, name)
        backend.release(lease)
        backend.release(lease)
        assert backend.holder(name) is None

    def test_release_keep_for_holds_the_lock_that_long(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        lease = self.acquire(backend, name)
        backend.release(lease, keep_for=self.short_ttl)
        assert other.try_acquire(name, self.ttl, new_owner("b")) is None
        time.sleep(self.short_ttl + 0.1)
        assert other.try_acquire(name, self.ttl, new_owner("b")) is not None

    def test_holder_shows_owner_and_token(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        lease = self.acquire(backend, name)
        holder = other.holder(name)
        assert holder is not None
        assert (holder.owner, holder.token) == (lease.owner, lease.token)
        assert holder.expires_in is None or 0 < holder.expires_in <= self.ttl

    def test_holder_of_a_free_lock_is_none(self, backend: Backend, name: str) -> None:
        assert backend.holder(name) is None

    def test_tokens_increase_across_owners(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        tokens = []
        for side in (backend, other, backend, other):
            lease = self.acquire(side, name)
            tokens.append(lease.token)
            side.release(lease)
        assert tokens == sorted(set(tokens))

    def test_token_after_expiry_is_higher(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        first = self.acquire(backend, name, self.short_ttl)
        self.wait_out(first)
        assert self.acquire(other, name).token > first.token

    def test_evict_moves_the_counter_up(self, backend: Backend, name: str) -> None:
        backend.release(self.acquire(backend, name))
        backend.evict(name, 1000)
        assert self.acquire(backend, name).token > 1000

    def test_evict_never_moves_the_counter_down(self, backend: Backend, name: str) -> None:
        backend.evict(name, 1000)
        backend.evict(name, 5)
        assert self.acquire(backend, name).token > 1000

    def test_evict_frees_the_lock_and_fences_its_holder(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        held = self.acquire(backend, name)
        other.evict(name)
        with pytest.raises(LeaseLost):
            backend.renew(held)
        assert self.acquire(other, name).token > held.token

    def test_wait_returns_soon_after_release(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        lease = self.acquire(backend, name)
        threading.Timer(0.2, backend.release, (lease,)).start()
        started = time.monotonic()
        other.wait(name, 5.0)
        assert time.monotonic() - started < 2.0

    def test_eight_threads_count_without_losing_updates(
        self, backend_factory: BackendFactory, name: str
    ) -> None:
        counter = {"value": 0, "acquired": 0}
        backends = [backend_factory() for _ in range(8)]

        def work(side: Backend) -> None:
            for _ in range(15):
                lease = side.try_acquire(name, self.ttl, new_owner("fuzz"))
                if lease is None:
                    time.sleep(0.002)
                    continue
                value = counter["value"]
                time.sleep(0.001)
                counter["value"] = value + 1
                counter["acquired"] += 1
                side.release(lease)

        threads = [threading.Thread(target=work, args=(side,)) for side in backends]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for side in backends:
            side.close()
        assert counter["acquired"] > 0
        assert counter["value"] == counter["acquired"]

    # -- the ledger -------------------------------------------------------------------------

    def test_claim_of_a_new_run_writes_attempt_one(self, backend: Backend, name: str) -> None:
        run = make_run(name)
        lease = self.acquire(backend, name)
        claim = backend.claim(run, lease)
        assert claim.latest is None
        assert claim.attempt is not None
        assert (claim.attempt.attempt, claim.attempt.state, claim.attempt.token) == (
            1,
            RUNNING,
            lease.token,
        )
        assert claim.attempt.started_at is not None

    def test_claim_is_idempotent(self, backend: Backend, name: str) -> None:
        run = make_run(name)
        lease = self.acquire(backend, name)
        first = backend.claim(run, lease)
        second = backend.claim(run, lease)
        assert second.attempt is None
        assert second.latest == first.attempt
        assert len(backend.attempts(run.run_id)) == 1

    def test_claim_with_a_stale_lease_raises(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        stale = self.acquire(backend, name, self.short_ttl)
        self.wait_out(stale)
        self.acquire(other, name)
        with pytest.raises(LeaseLost):
            backend.claim(make_run(name), stale)
        assert other.attempts(make_run(name).run_id) == []

    def test_takeover_abandons_the_running_attempt(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        run, first, second = self.orphaned(backend, other, name)
        found = other.claim(run, second)
        assert found.attempt is None and found.latest is not None
        assert (found.latest.state, found.latest.token) == (RUNNING, first.token)
        taken = other.claim(run, second, seen=found.latest.attempt)
        assert taken.attempt is not None and taken.attempt.attempt == 2
        states = [(a.attempt, a.state) for a in other.attempts(run.run_id)]
        assert states == [(2, RUNNING), (1, ABANDONED)]

    def test_claim_without_start_only_abandons(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        run, _, second = self.orphaned(backend, other, name)
        claim = other.claim(run, second, seen=1, start=False)
        assert claim.attempt is None
        assert [a.state for a in other.attempts(run.run_id)] == [ABANDONED]

    def test_a_later_firings_lease_abandons_an_earlier_firings_orphan(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        """How the first owner in a process closes what a killed owner left running."""
        run, _, second = self.orphaned(backend, other, name)
        later = make_run(name, run.scheduled_at + timedelta(minutes=1))
        other.claim(later, second)
        found = other.claim(run, second, seen=1, start=False)
        assert found.latest is not None and found.latest.state == RUNNING
        assert [a.state for a in other.attempts(run.run_id)] == [ABANDONED]
        assert [a.state for a in other.attempts(later.run_id)] == [RUNNING]

    def test_claim_with_an_outdated_view_writes_nothing(self, backend: Backend, name: str) -> None:
        run = make_run(name)
        lease = self.acquire(backend, name)
        backend.claim(run, lease)
        claim = backend.claim(run, lease, seen=5)
        assert claim.attempt is None and claim.latest is not None and claim.latest.attempt == 1

    def test_finish_records_the_outcome(self, backend: Backend, name: str) -> None:
        run = make_run(name)
        lease = self.acquire(backend, name)
        backend.claim(run, lease)
        assert backend.finish(run, lease, 1, Outcome(FAILED, "exit 3"))
        (row,) = backend.attempts(run.run_id)
        assert (row.state, row.error) == (FAILED, "exit 3")
        assert row.finished_at is not None and row.started_at is not None
        assert row.finished_at >= row.started_at

    def test_finish_with_a_stale_token_is_refused(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        run, stale, live = self.orphaned(backend, other, name)
        other.claim(run, live, seen=1)
        assert not backend.finish(run, stale, 1, Outcome(SUCCEEDED))
        assert [a.state for a in other.attempts(run.run_id)] == [RUNNING, ABANDONED]

    def test_claim_never_starts_over_a_succeeded_attempt(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        # The old owner's lease expires (a pause), the new owner reads attempt 1 as running
        # and decides to take over; the old owner's finish lands first (it is fenced by the
        # attempt row, which is still running under its token). The takeover's claim, with
        # the attempt number it saw, must find the firing done and write nothing.
        run, stale, live = self.orphaned(backend, other, name)
        assert backend.finish(run, stale, 1, Outcome(SUCCEEDED))
        claim = other.claim(run, live, seen=1, start=True)
        assert claim.attempt is None
        assert claim.latest is not None and claim.latest.state == SUCCEEDED
        assert [a.state for a in other.attempts(run.run_id)] == [SUCCEEDED]

    def test_claim_starts_over_a_skipped_attempt(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        run = make_run(name)
        assert backend.skip(run, "misfired", "contract")
        lease = self.acquire(other, name)
        claim = other.claim(run, lease, seen=1, start=True)
        assert claim.latest is not None and claim.latest.state == SKIPPED
        assert claim.attempt is not None and claim.attempt.attempt == 2
        states = [(a.attempt, a.state) for a in other.attempts(run.run_id)]
        assert states == [(2, RUNNING), (1, SKIPPED)]

    def test_claim_starts_over_a_failed_attempt(self, backend: Backend, name: str) -> None:
        run = make_run(name)
        lease = self.acquire(backend, name)
        backend.claim(run, lease)
        assert backend.finish(run, lease, 1, Outcome(FAILED, "exit 3"))
        claim = backend.claim(run, lease, seen=1, start=True)
        assert claim.attempt is not None and claim.attempt.attempt == 2
        states = [(a.attempt, a.state) for a in backend.attempts(run.run_id)]
        assert states == [(2, RUNNING), (1, FAILED)]

    def test_finish_records_a_reason(self, backend: Backend, other: Backend, name: str) -> None:
        run = make_run(name)
        lease = self.acquire(backend, name)
        backend.claim(run, lease)
        outcome = Outcome(INTERRUPTED, "cancelled: a newer firing arrived", reason="overlap")
        assert backend.finish(run, lease, 1, outcome)
        (row,) = other.attempts(run.run_id)
        assert (row.state, row.error, row.reason) == (INTERRUPTED, outcome.error, "overlap")
        fused = make_run(f"{name}-fused")
        got = backend.acquire_and_claim(fused, self.ttl, new_owner("a"))
        assert got is not None
        assert backend.finish_and_release(fused, got[0], 1, outcome)
        (row,) = other.attempts(fused.run_id)
        assert (row.state, row.error, row.reason) == (INTERRUPTED, outcome.error, "overlap")

    def test_finish_without_a_reason_leaves_it_null(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        run = make_run(name)
        lease = self.acquire(backend, name)
        backend.claim(run, lease)
        assert backend.finish(run, lease, 1, Outcome(FAILED, "exit 3"))
        (row,) = other.attempts(run.run_id)
        assert (row.state, row.error, row.reason) == (FAILED, "exit 3", None)
        assert [a.reason for a in other.history(name, 0)] == [None]

    def test_finish_after_release_is_recorded(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        run = make_run(name)
        lease = self.acquire(backend, name)
        backend.claim(run, lease)
        backend.release(lease)
        assert backend.finish(run, lease, 1, Outcome(SUCCEEDED))
        (row,) = other.attempts(run.run_id)
        assert (row.state, row.token) == (SUCCEEDED, lease.token)
        assert row.finished_at is not None

    def test_finish_after_release_and_takeover_is_refused(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        run = make_run(name)
        first = self.acquire(backend, name)
        backend.claim(run, first)
        backend.release(first)
        second = self.acquire(other, name)
        assert other.claim(run, second, seen=1).attempt is not None
        assert not backend.finish(run, first, 1, Outcome(SUCCEEDED))
        assert [(a.attempt, a.state) for a in other.attempts(run.run_id)] == [
            (2, RUNNING),
            (1, ABANDONED),
        ]

    def test_finish_twice_is_refused(self, backend: Backend, name: str) -> None:
        run = make_run(name)
        lease = self.acquire(backend, name)
        backend.claim(run, lease)
        assert backend.finish(run, lease, 1, Outcome(SUCCEEDED))
        assert not backend.finish(run, lease, 1, Outcome(FAILED, "late"))

    def test_acquire_and_claim_of_a_busy_lock_is_none(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        self.acquire(backend, name)
        assert other.acquire_and_claim(make_run(name), self.ttl, new_owner("b")) is None

    def test_acquire_and_claim_returns_the_previous_outcome(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        run = make_run(name)
        got = backend.acquire_and_claim(run, self.ttl, new_owner("a"))
        assert got is not None
        lease, claim = got
        assert claim.attempt is not None
        backend.finish_and_release(run, lease, 1, Outcome(SUCCEEDED))
        again = other.acquire_and_claim(run, self.ttl, new_owner("b"))
        assert again is not None
        assert again[1].attempt is None
        assert again[1].latest is not None and again[1].latest.state == SUCCEEDED

    def test_finish_and_release_frees_the_lock(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        run = make_run(name)
        got = backend.acquire_and_claim(run, self.ttl, new_owner("a"))
        assert got is not None
        assert backend.finish_and_release(run, got[0], 1, Outcome(SUCCEEDED))
        assert other.try_acquire(name, self.ttl, new_owner("b")) is not None

    def test_finish_and_release_releases_even_when_refused(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        run = make_run(name)
        lease = self.acquire(backend, name)
        assert not backend.finish_and_release(run, lease, 1, Outcome(SUCCEEDED))
        assert other.try_acquire(name, self.ttl, new_owner("b")) is not None

    def test_skip_records_a_firing_that_never_ran(self, backend: Backend, name: str) -> None:
        run = make_run(name)
        assert backend.skip(run, "misfired", "r1")
        (row,) = backend.attempts(run.run_id)
        assert (row.state, row.reason, row.token, row.replica) == (SKIPPED, "misfired", None, "r1")

    def test_skip_is_written_once(self, backend: Backend, other: Backend, name: str) -> None:
        run = make_run(name)
        assert backend.skip(run, "misfired", "r1")
        assert not other.skip(run, "misfired", "r2")
        assert len(backend.attempts(run.run_id)) == 1

    def test_skip_after_an_attempt_writes_nothing(self, backend: Backend, name: str) -> None:
        run = make_run(name)
        backend.claim(run, self.acquire(backend, name))
        assert not backend.skip(run, "overlap", "r1")

    def test_history_is_newest_first_and_limited(self, backend: Backend, name: str) -> None:
        base = datetime(2026, 12, 1, tzinfo=UTC)
        runs = [make_run(name, base + timedelta(minutes=i)) for i in range(5)]
        for run in runs:
            backend.skip(run, "misfired", "r1")
        assert [a.run_id for a in backend.history(name, 3)] == [r.run_id for r in runs[::-1][:3]]
        assert len(backend.history(name, 0)) == 5
        assert all(a.job == name for a in backend.history(None, 0) if a.run_id.startswith(name))

    def test_prune_drops_old_and_surplus_attempts(self, backend: Backend, name: str) -> None:
        base = datetime(2026, 12, 1, tzinfo=UTC)
        runs = [make_run(name, base + timedelta(minutes=i)) for i in range(6)]
        for run in runs:
            backend.skip(run, "misfired", "r1")
        backend.prune(base + timedelta(minutes=1), keep=3)
        assert [a.run_id for a in backend.history(name, 0)] == [r.run_id for r in runs[::-1][:3]]

    def test_prune_keeps_running_attempts(self, backend: Backend, name: str) -> None:
        run = make_run(name, datetime(2020, 1, 1, tzinfo=UTC))
        backend.claim(run, self.acquire(backend, name))
        backend.prune(datetime(2026, 1, 1, tzinfo=UTC), keep=0)
        assert [a.state for a in backend.attempts(run.run_id)] == [RUNNING]


class SharedStateContract:
    """The :class:`~singleton.backends.base.SharedState` obligations (fleet fingerprints,
    operator switches). Mixed into a backend's contract class next to
    :class:`BackendContract`, whose fixtures it uses."""

    def test_put_then_scan_finds_the_value(
        self, backend: Backend, other: Backend, name: str
    ) -> None:
        backend.put(f"{name}/r1", "abc")
        assert other.scan(f"{name}/") == {f"{name}/r1": "abc"}

    def test_put_overwrites(self, backend: Backend, name: str) -> None:
        backend.put(f"{name}/r1", "old")
        backend.put(f"{name}/r1", "new")
        assert backend.scan(f"{name}/") == {f"{name}/r1": "new"}

    def test_scan_keeps_to_its_prefix(self, backend: Backend, name: str) -> None:
        backend.put(f"{name}/a/1", "x")
        backend.put(f"{name}/b/1", "y")
        assert backend.scan(f"{name}/a/") == {f"{name}/a/1": "x"}

    def test_a_value_with_a_ttl_disappears(self, backend: Backend, name: str) -> None:
        backend.put(f"{name}/short", "x", ttl=1.0)
        backend.put(f"{name}/long", "y")
        assert set(backend.scan(f"{name}/")) == {f"{name}/short", f"{name}/long"}
        time.sleep(2.2)
        assert backend.scan(f"{name}/") == {f"{name}/long": "y"}

    def test_delete_removes_and_tolerates_a_missing_key(self, backend: Backend, name: str) -> None:
        backend.put(f"{name}/r1", "x")
        backend.delete(f"{name}/r1")
        backend.delete(f"{name}/never")
        assert backend.scan(f"{name}/") == {}

    def test_a_large_value_survives(self, backend: Backend, name: str) -> None:
        value = "0123456789abcdef" * 16384
        backend.put(f"{name}/big", value)
        assert backend.scan(f"{name}/big") == {f"{name}/big": value}
