"""``singleton.lock``: the coordinator's lock in the user's own code.

A lock name shares the job namespace on purpose: ``with singleton.lock("compact")`` in a
maintenance script excludes the scheduled job ``compact`` and is fenced the same way.

One backend connection per URL is kept for the life of the process, so a loop of lock
cycles costs round trips, not connects.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from singleton.backends import open_backend
from singleton.backends.base import Backend, Lease, default_replica_id, new_owner
from singleton.clock import SYSTEM_CLOCK, Clock
from singleton.durations import parse_duration
from singleton.errors import ConfigError, LeaseLost, LockBusy
from singleton.jobs import check_name
from singleton.lease import LeaseKeeper

#: Longest single wait for a busy lock before trying again (a release usually wakes us).
POLL = 0.5

_shared: dict[str, Backend] = {}
_shared_lock = threading.Lock()


def shared_backend(url: str | None) -> Backend:
    """The process's one connection to ``url`` (default ``SINGLETON_BACKEND__URL``)."""
    url = url or os.environ.get("SINGLETON_BACKEND__URL")
    if not url:
        raise ConfigError("no backend URL: pass url=... or set SINGLETON_BACKEND__URL")
    with _shared_lock:
        backend = _shared.get(url)
        if backend is None:
            backend = _shared[url] = open_backend(url)
        return backend


@atexit.register
def _close_shared() -> None:
    with _shared_lock:
        for backend in _shared.values():
            backend.close()
        _shared.clear()


def seconds(value: float | timedelta | str, what: str, *, positive: bool = False) -> float:
    """A duration from seconds, a ``timedelta`` or text such as ``"30s"``."""
    result = parse_duration(value)
    if result < 0 or (positive and result == 0):
        raise ConfigError(
            f"{what} must be {'more than' if positive else 'at least'} 0s, got {value!r}"
        )
    return result


class Held:
    """A held lease, as the ``with`` block sees it: its fencing token and whether it is
    still ours. Pass ``token`` to every write the block makes to a fenced resource."""

    def __init__(self, keeper: LeaseKeeper) -> None:
        self._keeper = keeper
        self._lost = threading.Event()
        self.reason: str | None = None

    @property
    def name(self) -> str:
        return self._keeper.lease.name

    @property
    def token(self) -> int:
        return self._keeper.lease.token

    @property
    def lost(self) -> bool:
        """True once the lease is gone; another process may hold the lock from then on."""
        return self._lost.is_set()

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease is gone; call it between steps."""
        if self._lost.is_set():
            raise LeaseLost(f"lock {self.name!r} (token {self.token}) was lost: {self.reason}")

    def remaining(self) -> float:
        """Seconds left on the lease by the local monotonic deadline."""
        return self._keeper.remaining()

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until the lease is lost (True) or ``timeout`` passes (False)."""
        return self._lost.wait(timeout)

    def _lose(self, reason: str) -> None:
        self.reason = reason
        self._lost.set()


def try_lock(
    backend: Backend, name: str, ttl: float, owner: str, clock: Clock = SYSTEM_CLOCK
) -> Lease | None:
    """``try_acquire``, refusing a grant whose reply was read after its deadline (a pause
    between send and reply): someone else may hold the lock by then, so it is let go."""
    lease = backend.try_acquire(name, ttl, owner)
    if lease is not None and clock.monotonic() >= lease.deadline:
        backend.release(lease)
        return None
    return lease


def acquire(
    backend: Backend, name: str, ttl: float, wait: float, clock: Clock = SYSTEM_CLOCK
) -> Lease:
    """Acquire ``name``, waiting up to ``wait`` seconds; :class:`LockBusy` if it stays taken."""
    owner = new_owner(default_replica_id())
    deadline = clock.monotonic() + wait
    while True:
        lease = try_lock(backend, name, ttl, owner, clock)
        if lease is not None:
            return lease
        left = deadline - clock.monotonic()
        if left <= 0:
            holder = backend.holder(name)
            held_by = f" (held by {holder.owner}, token {holder.token})" if holder else ""
            raise LockBusy(f"lock {name!r} is busy{held_by}")
        backend.wait(name, min(left, POLL))


@contextmanager
def lock(
    name: str,
    *,
    url: str | None = None,
    ttl: float | timedelta | str = 30.0,
    wait: float | timedelta | str = 0.0,
) -> Iterator[Held]:
    """Hold the lock ``name`` for the ``with`` block, renewing it every ``ttl/3``.

    Waits up to ``wait`` for a busy lock, then raises :class:`LockBusy`. On exit it releases
    the lock, and raises :class:`LeaseLost` if the lease was lost during the block (unless
    the block is already raising), because work done after the loss may have overlapped
    another holder's.
    """
    check_name(name, "lock")
    backend = shared_backend(url)
    lease = acquire(backend, name, seconds(ttl, "ttl", positive=True), seconds(wait, "wait"))
    held: Held
    keeper = LeaseKeeper(backend, lease, SYSTEM_CLOCK, on_lost=lambda why: held._lose(why))
    held = Held(keeper)
    keeper.start()
    failed = False
    try:
        yield held
    except BaseException:
        failed = True
        raise
    finally:
        backend.release(keeper.stop())
        if not failed:
            held.check()
