"""``singleton.leader``: long-lived leadership with terms, for the user's own code.

A campaign thread keeps trying for the lock; each time it wins, a new **term** begins with
its own fencing token; when the lease is lost the term ends and the campaign starts again.
Code learns of it through callbacks (``on_gain``, ``on_loss``) or by iterating over
:meth:`Election.terms`. Leaving the ``with`` block resigns: the lock is released at once,
so another candidate wins without waiting for a TTL.

Example::

    with singleton.leader("billing-scheduler", ttl="10s") as election:
        for term in election.terms():          # blocks until this process leads
            while not term.lost:
                schedule_invoices(fencing_token=term.token)
                term.wait_lost(timeout=1.0)
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from singleton.backends.base import Backend, default_replica_id, new_owner
from singleton.clock import SYSTEM_CLOCK
from singleton.jobs import check_name
from singleton.lease import LeaseKeeper
from singleton.locking import POLL, Held, seconds, shared_backend, try_lock

log = logging.getLogger("singleton.leader")

TermCallback = Callable[[Held], None]


class Election:
    """A campaign for one lock name; terms are :class:`~singleton.locking.Held` leases."""

    def __init__(
        self,
        backend: Backend,
        name: str,
        ttl: float,
        on_gain: TermCallback | None,
        on_loss: TermCallback | None,
    ) -> None:
        self._backend = backend
        self._name = name
        self._ttl = ttl
        self._on_gain = on_gain
        self._on_loss = on_loss
        self._resigned = threading.Event()
        self._terms: queue.Queue[Held | None] = queue.Queue()
        self._current: Held | None = None
        self._thread = threading.Thread(target=self._campaign, name=f"leader-{name}", daemon=True)

    @property
    def current(self) -> Held | None:
        """The term in progress, if this process leads now."""
        term = self._current
        return term if term is not None and not term.lost else None

    def terms(self) -> Iterator[Held]:
        """Each term as it begins, until the election is resigned."""
        while True:
            term = self._terms.get()
            if term is None:
                return
            yield term

    def start(self) -> Election:
        self._thread.start()
        return self

    def resign(self) -> None:
        """Stop campaigning and let go of the lock now."""
        self._resigned.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()
        self._terms.put(None)

    def _campaign(self) -> None:
        owner = new_owner(default_replica_id())
        while not self._resigned.is_set():
            try:
                lease = try_lock(self._backend, self._name, self._ttl, owner)
                if lease is None:
                    self._backend.wait(self._name, POLL)
                    continue
            except Exception as exc:
                # A coordinator blip must not end the campaign: try again after a pause.
                log.warning(
                    "campaign failed", extra={"fields": {"lock": self._name, "error": str(exc)}}
                )
                self._resigned.wait(POLL)
                continue
            self._serve(LeaseKeeper(self._backend, lease, SYSTEM_CLOCK, on_lost=self._lost))
            owner = new_owner(default_replica_id())

    def _lost(self, reason: str) -> None:
        if self._current is not None:
            self._current._lose(reason)

    def _serve(self, keeper: LeaseKeeper) -> None:
        """One term: announce it, hold it until it is lost or resigned, then let go."""
        term = Held(keeper)
        self._current = term
        keeper.start()
        self._call(self._on_gain, term)
        self._terms.put(term)
        while not term.wait_lost(POLL) and not self._resigned.is_set():
            pass
        lease = keeper.stop()
        if not term.lost:
            term._lose("resigned")
        try:
            self._backend.release(lease)
        except Exception as exc:
            log.warning("release failed", extra={"fields": {"lock": self._name, "error": str(exc)}})
        self._call(self._on_loss, term)

    def _call(self, callback: TermCallback | None, term: Held) -> None:
        if callback is None:
            return
        try:
            callback(term)
        except Exception:
            log.exception("leader callback failed", extra={"fields": {"lock": self._name}})


@contextmanager
def leader(
    name: str,
    *,
    url: str | None = None,
    ttl: float | timedelta | str = 30.0,
    on_gain: TermCallback | None = None,
    on_loss: TermCallback | None = None,
) -> Iterator[Election]:
    """Campaign for ``name`` while the ``with`` block runs; resign when it ends."""
    check_name(name, "lock")
    election = Election(
        shared_backend(url), name, seconds(ttl, "ttl", positive=True), on_gain, on_loss
    ).start()
    try:
        yield election
    finally:
        election.resign()
