"""The lease keeper: renews every ttl/3, and declares the lease lost on a refused renewal or
at the local deadline, whichever comes first; once, and never after :meth:`stop`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime

import pytest

from singleton.backends.base import DRIFT_FACTOR, DRIFT_FLOOR, Lease, lease_deadline
from singleton.backends.memory import MemoryBackend
from singleton.clock import SYSTEM_CLOCK, Clock
from singleton.errors import BackendUnavailable
from singleton.lease import LeaseKeeper
from tests.firing_support import wait_for


class ScriptedBackend(MemoryBackend):
    """A memory backend whose renewals can be made to fail, recording when each was asked."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__(clock=clock)
        self.renewals: list[float] = []
        self.failure: Callable[[], Exception] | None = None
        self.failures_left = -1  # -1: every renewal fails while ``failure`` is set

    def renew(self, lease: Lease) -> Lease:
        self.renewals.append(time.monotonic())
        if self.failure is not None and self.failures_left != 0:
            self.failures_left -= 1
            raise self.failure()
        return super().renew(lease)


class Calls:
    """Records calls of a keeper callback."""

    def __init__(self) -> None:
        self.args: list[object] = []
        self.times: list[float] = []

    def __call__(self, arg: object) -> None:
        self.args.append(arg)
        self.times.append(time.monotonic())


@contextmanager
def keeping(
    backend: MemoryBackend,
    ttl: float,
    clock: Clock = SYSTEM_CLOCK,
    lease: Lease | None = None,
) -> Iterator[tuple[LeaseKeeper, Calls, Calls]]:
    """A started keeper on a fresh lease of ``lock``; yields it with its on_lost and
    on_renewal_failed recorders, and stops it on the way out."""
    if lease is None:
        lease = backend.try_acquire("lock", ttl, "me:1")
        assert lease is not None
    lost, failed = Calls(), Calls()
    keeper = LeaseKeeper(backend, lease, clock, on_lost=lost, on_renewal_failed=failed).start()
    try:
        yield keeper, lost, failed
    finally:
        keeper.stop()


def test_the_keeper_renews_every_third_of_the_ttl() -> None:
    """Each renewal a third of the TTL after the previous grant was sent (less the drift
    allowance that the deadline keeps)."""
    backend = ScriptedBackend()
    sent = time.monotonic()
    with keeping(backend, ttl=0.3) as (_, lost, _failed):
        wait_for("five renewals", lambda: len(backend.renewals) >= 5)
    gaps = [b - a for a, b in zip([sent, *backend.renewals], backend.renewals, strict=False)]

    assert min(gaps) >= 0.3 / 3 - (0.3 * DRIFT_FACTOR + DRIFT_FLOOR), "never sooner"
    assert backend.renewals[4] - sent < 0.3 * 5 / 3 + 0.25
    assert lost.args == []


def test_a_kept_lease_outlives_its_ttl_and_keeps_others_out() -> None:
    backend = MemoryBackend()
    with keeping(backend, ttl=0.3) as (keeper, lost, _):
        first_deadline = keeper.lease.deadline
        time.sleep(1.0)
        assert backend.try_acquire("lock", 0.3, "other:1") is None
        assert keeper.lease.deadline > first_deadline + 0.5
        assert not keeper.lost
        assert keeper.remaining() > 0
    assert lost.args == []


def test_a_refused_renewal_declares_the_lease_lost_once() -> None:
    backend = ScriptedBackend()
    with keeping(backend, ttl=0.3) as (keeper, lost, failed):
        backend.release(keeper.lease)  # the lease is gone: the next renewal is refused
        wait_for("on_lost", lambda: lost.args)
        time.sleep(0.3)
        assert keeper.lost
        assert keeper.remaining() == 0.0

    assert len(lost.args) == 1
    assert str(lost.args[0]).startswith("renewal refused")
    assert len(backend.renewals) == 1, "no renewal after a refusal"
    assert failed.args == []


def test_an_unreachable_coordinator_loses_the_lease_once_at_the_deadline() -> None:
    backend = ScriptedBackend()
    backend.failure = lambda: BackendUnavailable("coordinator down")
    with keeping(backend, ttl=0.3) as (keeper, lost, failed):
        deadline = keeper.lease.deadline
        wait_for("on_lost", lambda: lost.args)
        time.sleep(0.2)

    assert lost.args == ["deadline passed"]
    assert lost.times[0] >= deadline
    assert len(failed.args) >= 2, "unreachable is not lost: it keeps trying until the deadline"
    assert all("BackendUnavailable: coordinator down" in str(arg) for arg in failed.args)


def test_a_renewal_that_fails_once_is_retried_sooner_and_the_lease_kept() -> None:
    backend = ScriptedBackend()
    backend.failure = lambda: BackendUnavailable("blip")
    backend.failures_left = 1
    with keeping(backend, ttl=0.3) as (keeper, lost, failed):
        wait_for("the retried renewal", lambda: len(backend.renewals) >= 2)
        time.sleep(0.5)
        assert not keeper.lost

    assert len(failed.args) == 1
    assert backend.renewals[1] - backend.renewals[0] < 0.1 * 0.9, "retried after ttl/9"
    assert lost.args == []


def test_stop_stops_renewing_and_returns_the_latest_lease() -> None:
    backend = ScriptedBackend()
    with keeping(backend, ttl=0.3) as (keeper, lost, _):
        first = keeper.lease
        wait_for("a renewal", lambda: backend.renewals)
        latest = keeper.stop()
        count = len(backend.renewals)
        time.sleep(0.4)

    assert len(backend.renewals) == count
    assert latest.deadline > first.deadline
    assert (latest.owner, latest.token) == (first.owner, first.token)
    assert lost.args == [], "a stopped keeper never declares a loss, even past the deadline"


def test_a_stopped_keeper_does_not_report_a_loss_while_renewals_fail() -> None:
    backend = ScriptedBackend()
    backend.failure = lambda: BackendUnavailable("down")
    with keeping(backend, ttl=0.3) as (keeper, lost, _):
        wait_for("a failed renewal", lambda: backend.renewals)
        keeper.stop()
        time.sleep(0.4)
    assert lost.args == []


class StoppedClock:
    """A monotonic clock the test moves by hand; waits do not move it."""

    def __init__(self) -> None:
        self.mono = 1000.0

    def now(self) -> datetime:
        return SYSTEM_CLOCK.now()

    def monotonic(self) -> float:
        return self.mono

    def wait(self, event: threading.Event, timeout: float) -> bool:
        return event.wait(0.005)

    def sleep(self, seconds: float) -> None:
        time.sleep(0.005)


def test_after_a_pause_past_the_deadline_the_lease_is_lost_without_a_renewal() -> None:
    clock = StoppedClock()
    backend = ScriptedBackend(clock=clock)
    lease = backend.try_acquire("lock", 10.0, "me:1")
    assert lease is not None
    with keeping(backend, ttl=10.0, clock=clock, lease=lease) as (_keeper, lost, _):
        time.sleep(0.05)
        clock.mono += 30.0  # SIGSTOP, a GC pause: the process wakes long past its deadline
        wait_for("on_lost", lambda: lost.args)

    assert lost.args == ["deadline passed"]
    assert backend.renewals == [], "a stale owner must not renew itself back to life"


def test_a_grant_read_after_its_deadline_is_lost_before_start_returns() -> None:
    """TESTING F2b: a pause between sending the acquire and reading its reply."""
    clock = StoppedClock()
    backend = ScriptedBackend(clock=clock)
    lease = backend.try_acquire("lock", 10.0, "me:1")
    assert lease is not None
    clock.mono += 11.0
    lost = Calls()

    keeper = LeaseKeeper(backend, lease, clock, on_lost=lost).start()

    assert lost.args == ["deadline passed before the grant arrived"]
    assert keeper.lost and keeper.remaining() == 0
    keeper.stop()
    assert backend.renewals == []


def test_the_first_renewal_is_due_a_third_of_the_ttl_after_the_acquire_was_sent() -> None:
    """A reply that came late leaves less of the lease: the renewal must not wait a full
    third of the TTL from when the reply was read."""
    clock = StoppedClock()
    backend = ScriptedBackend(clock=clock)
    lease = backend.try_acquire("lock", 10.0, "me:1")
    assert lease is not None
    clock.mono += 2.0  # the reply came 2 s after the request went out
    with keeping(backend, ttl=10.0, clock=clock, lease=lease) as (_keeper, lost, _):
        clock.mono += 1.0  # 3 s after the send: not yet due
        time.sleep(0.05)
        assert backend.renewals == []
        clock.mono += 0.5  # 3.5 s after the send, 1.5 s after the reply
        wait_for("the first renewal", lambda: backend.renewals)
    assert lost.args == []


@pytest.mark.parametrize("ttl", [0.3, 3.0, 30.0])
def test_the_deadline_is_before_the_ttl_from_when_the_acquire_was_sent(ttl: float) -> None:
    sent = 100.0
    deadline = lease_deadline(sent, ttl)
    assert sent < deadline < sent + ttl
    assert deadline == pytest.approx(sent + ttl - (ttl * 0.01 + 0.002))


def test_stopping_a_keeper_past_its_deadline_reports_the_loss() -> None:
    clock = StoppedClock()
    backend = ScriptedBackend(clock=clock)
    lease = backend.try_acquire("lock", 10.0, "me:1")
    assert lease is not None
    with keeping(backend, ttl=10.0, clock=clock, lease=lease) as (keeper, lost, _):
        clock.mono += 30.0  # paused past the deadline, and stopped before the keeper looked
        keeper.stop()
    assert lost.args == ["deadline passed"]


def test_a_lease_let_go_before_its_first_renewal_never_takes_a_thread() -> None:
    backend = ScriptedBackend()
    lease = backend.try_acquire("short-job", 0.6, "me:1")
    assert lease is not None
    keeper = LeaseKeeper(backend, lease, SYSTEM_CLOCK, on_lost=Calls()).start()
    threads = [thread.name for thread in threading.enumerate()]
    keeper.stop()
    time.sleep(0.4)  # past when the first renewal would have been due

    assert "lease-short-job" not in threads
    assert "lease-short-job" not in [thread.name for thread in threading.enumerate()]
    assert backend.renewals == []


def test_a_keeper_that_cannot_get_a_thread_gives_the_lease_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = ScriptedBackend()
    lease = backend.try_acquire("starved", 3.0, "me:1")
    assert lease is not None
    lost = Calls()
    keeper = LeaseKeeper(backend, lease, SYSTEM_CLOCK, on_lost=lost)

    def out_of_threads(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", out_of_threads)
    keeper.begin()  # what the starter does when the first renewal is due
    monkeypatch.undo()

    assert lost.args == ["cannot renew: can't start new thread"]
    assert keeper.lost
