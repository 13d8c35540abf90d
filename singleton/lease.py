"""The lease keeper: renews a held lease and decides, locally, when it is lost.

Why a local deadline: the coordinator's word arrives late or not at all (a partition, a GC
pause, SIGSTOP). The keeper therefore never trusts that a lease is still held past
``deadline`` — the monotonic instant computed from when the acquire or the last successful
renewal was *sent* — and declares the lease lost then, even if no server said so. After a
pause, the first thing the keeper does is compare the clock with the deadline, before any
renewal could make a stale owner look fresh.

Why a keeper's thread starts only at its first renewal: most firings end well within a
third of their TTL, and a replica firing thousands of jobs at once spent a fifth of each
firing starting and joining a thread that never renewed anything. One starter thread per
clock holds the keepers until their first renewal is due, and a keeper stopped before then
never has a thread. The first renewal is due before the deadline, so the deadline is still
watched by the keeper's own thread.

Why renewals are timed from the deadline: it is reckoned from when the request was sent,
so a reply that came late leaves less of the lease, and the next renewal must come sooner.
A grant whose reply came after its deadline (a pause between send and reply, TESTING F2b)
is lost at :meth:`LeaseKeeper.start`, before its job can start.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections.abc import Callable

from singleton.backends.base import Lease, LockBackend
from singleton.clock import Clock
from singleton.errors import LeaseLost

log = logging.getLogger("singleton.lease")


class LeaseKeeper:
    """Renews ``lease`` every ``ttl/3`` in a daemon thread until :meth:`stop`.

    ``on_lost(reason)`` is called once, when a renewal is refused or the deadline passes
    (from the keeper's thread, or from whoever notices the deadline first: :meth:`check`,
    :meth:`stop`). ``on_renewal_failed(error)`` is called for each renewal that
    could not reach the coordinator (the keeper retries until the deadline).
    """

    def __init__(
        self,
        backend: LockBackend,
        lease: Lease,
        clock: Clock,
        on_lost: Callable[[str], None],
        on_renewal_failed: Callable[[str], None] = lambda error: None,
        on_renewed: Callable[[Lease], None] = lambda lease: None,
    ) -> None:
        self._backend = backend
        self._lease = lease
        self._clock = clock
        self._on_lost = on_lost
        self._on_renewal_failed = on_renewal_failed
        self._on_renewed = on_renewed
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._losing = threading.Lock()
        self._next_renewal = 0.0
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    @property
    def lease(self) -> Lease:
        return self._lease

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def remaining(self) -> float:
        """Seconds until the local deadline; 0 once lost."""
        if self._lost.is_set():
            return 0.0
        return max(0.0, self._lease.deadline - self._clock.monotonic())

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def start(self) -> LeaseKeeper:
        """Watch the lease; lost at once if its deadline passed before its grant arrived."""
        if self._clock.monotonic() >= self._lease.deadline:
            self._lose("deadline passed before the grant arrived")
            return self
        self._next_renewal = self._renewal_due()
        _starter(self._clock).add(self._next_renewal, self)
        return self

    def _renewal_due(self) -> float:
        """A third of the TTL after the current grant was sent (two thirds before its end)."""
        return self._lease.deadline - self._lease.ttl * 2 / 3

    def begin(self) -> None:
        """Start renewing in a thread of its own (the starter calls this when the first
        renewal is due), unless already stopped."""
        with self._starting:
            if self._stop.is_set() or self._thread is not None:
                return
            thread = threading.Thread(
                target=self._run, name=f"lease-{self._lease.name}", daemon=True
            )
            try:
                thread.start()
            except RuntimeError as exc:  # out of threads: nothing would watch the deadline
                failed: RuntimeError | None = exc
            else:
                self._thread, failed = thread, None
        if failed is not None:
            self._lose(f"cannot renew: {failed}")

    def stop(self) -> Lease:
        """Stop renewing (the caller releases); returns the latest lease."""
        with self._starting:
            if self._stop.is_set():
                return self._lease
            self._stop.set()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        # A pause can end with stop() racing the keeper's own deadline check: whoever runs
        # first, a lease past its deadline is reported lost.
        self._expire()
        return self._lease

    def check(self) -> bool:
        """Whether the lease is lost. A deadline passed while the keeper's thread has not
        looked yet (asleep, starved, or not started) is declared lost now, by the caller."""
        if not self._stop.is_set():
            self._expire()
        return self._lost.is_set()

    def _expire(self) -> None:
        if self._clock.monotonic() >= self._lease.deadline:
            self._lose("deadline passed")

    def _lose(self, reason: str) -> None:
        with self._losing:  # once, whichever thread notices first
            if self._lost.is_set():
                return
            self._lost.set()
        self._on_lost(reason)

    def _run(self) -> None:
        interval = self._lease.ttl / 3
        next_renewal = self._next_renewal
        while not self._stop.is_set():
            now = self._clock.monotonic()
            wake = min(next_renewal, self._lease.deadline)
            if wake > now:
                if self._clock.wait(self._stop, wake - now):
                    return
                continue
            if now >= self._lease.deadline:
                self._lose("deadline passed")
                return
            try:
                self._lease = self._backend.renew(self._lease)
            except LeaseLost as exc:
                self._lose(f"renewal refused: {exc}")
                return
            except Exception as exc:
                # Unreachable is not lost: retry sooner, until the deadline decides.
                self._on_renewal_failed(f"{type(exc).__name__}: {exc}")
                next_renewal = self._clock.monotonic() + interval / 3
                continue
            self._on_renewed(self._lease)
            next_renewal = self._renewal_due()


class _Starter:
    """Begins keepers when their first renewal is due, in one thread that lives while any
    keeper waits (a heap by due time, on one clock)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, LeaseKeeper]] = []
        self._order = itertools.count()
        self._mutex = threading.Lock()
        self._changed = threading.Event()
        self._running = False

    def add(self, due: float, keeper: LeaseKeeper) -> None:
        with self._mutex:
            heapq.heappush(self._heap, (due, next(self._order), keeper))
            if self._heap[0][2] is keeper:
                self._changed.set()
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="lease-starter", daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._mutex:
                while self._heap and self._heap[0][2].stopped:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._running = False
                    return
                due, _, keeper = self._heap[0]
                wait = due - self._clock.monotonic()
                if wait <= 0:
                    heapq.heappop(self._heap)
                else:
                    self._changed.clear()
            if wait <= 0:
                keeper.begin()
            else:
                self._clock.wait(self._changed, wait)


_starters: dict[int, _Starter] = {}
_starters_mutex = threading.Lock()


def _starter(clock: Clock) -> _Starter:
    with _starters_mutex:
        starter = _starters.get(id(clock))
        if starter is None:
            starter = _starters[id(clock)] = _Starter(clock)
        return starter
