"""The lease keeper: renews a held lease and decides, locally, when it is lost.

Why a local deadline: the coordinator's word arrives late or not at all (a partition, a GC
pause, SIGSTOP). The keeper therefore never trusts that a lease is still held past
``deadline`` — the monotonic instant computed from when the acquire or the last successful
renewal was *sent* — and declares the lease lost then, even if no server said so. After a
pause, the first thing the keeper does is compare the clock with the deadline, before any
renewal could make a stale owner look fresh.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from singleton.backends.base import Lease, LockBackend
from singleton.clock import Clock
from singleton.errors import LeaseLost

log = logging.getLogger("singleton.lease")


class LeaseKeeper:
    """Renews ``lease`` every ``ttl/3`` in a daemon thread until :meth:`stop`.

    ``on_lost(reason)`` is called once, from the keeper's thread, when a renewal is refused
    or the deadline passes. ``on_renewal_failed(error)`` is called for each renewal that
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
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.name}", daemon=True)

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

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> Lease:
        """Stop renewing (the caller releases); returns the latest lease."""
        if self._stop.is_set():
            return self._lease
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()
        # A pause can end with stop() racing the keeper's own deadline check: whoever runs
        # first, a lease past its deadline is reported lost.
        if self._clock.monotonic() >= self._lease.deadline:
            self._lose("deadline passed")
        return self._lease

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost.set()
            self._on_lost(reason)

    def _run(self) -> None:
        interval = self._lease.ttl / 3
        next_renewal = self._clock.monotonic() + interval
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
            next_renewal = self._clock.monotonic() + interval
