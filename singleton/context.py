"""What a running job knows about its firing, and how it learns that it must stop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from singleton.clock import iso_z
from singleton.errors import LeaseLost


class Cancel:
    """A one-shot stop signal that remembers why it fired first.

    The reason becomes the attempt's ledger state: ``lost_lease`` when the lease keeper gave
    up, ``timed_out`` when the job's ``timeout`` passed, ``interrupted`` on shutdown or when
    a newer firing cancelled it (``overlap: cancel_other``, whose ``cause`` is ``overlap``:
    the ledger keeps it, so nobody takes that attempt over as an orphan).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._cause: str | None = None
        self._hooks: list[Callable[[str], None]] = []

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def cause(self) -> str | None:
        """Why the reason, where the ledger must tell it apart (``overlap``)."""
        return self._cause

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._event.wait(timeout)

    def set(self, reason: str, cause: str | None = None) -> None:
        with self._lock:
            if self._reason is not None:
                return
            self._reason = reason
            self._cause = cause
            hooks = list(self._hooks)
        self._event.set()
        for hook in hooks:
            hook(reason)

    def on_set(self, hook: Callable[[str], None]) -> None:
        """Call ``hook(reason)`` once when the signal fires (at once if it already has)."""
        with self._lock:
            if self._reason is None:
                self._hooks.append(hook)
                return
            reason = self._reason
        hook(reason)


@dataclass
class JobContext:
    """Handed to every ``call`` target; commands and HTTP targets get the same values as env.

    ``token`` is the fencing token: pass it to every write the job makes to a resource that
    can check it (``singleton.fencing``). ``lost`` turns true when the lease is gone; from then
    on another replica may be running this firing.
    """

    job: str
    run_id: str
    attempt: int
    scheduled_at: datetime
    token: int
    replica_id: str
    cancel: Cancel = field(default_factory=Cancel, repr=False)
    lease_remaining: Callable[[], float] = field(default=lambda: float("inf"), repr=False)

    @property
    def lost(self) -> bool:
        """True once the lease is lost (or the run was stopped for another reason)."""
        return self.cancel.is_set()

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the job should stop now; call it between steps."""
        if self.cancel.is_set():
            raise LeaseLost(f"{self.run_id}: stop requested ({self.cancel.reason})")

    def remaining(self) -> float:
        """Seconds left on the lease by the local monotonic deadline (0 when lost)."""
        return 0.0 if self.cancel.is_set() else max(0.0, self.lease_remaining())

    def env(self) -> dict[str, str]:
        """The ``SINGLETON_*`` variables of DESIGN's contract, for child processes."""
        return {
            "SINGLETON_JOB": self.job,
            "SINGLETON_RUN_ID": self.run_id,
            "SINGLETON_ATTEMPT": str(self.attempt),
            "SINGLETON_FENCING_TOKEN": str(self.token),
            "SINGLETON_SCHEDULED_AT": iso_z(self.scheduled_at),
            "SINGLETON_REPLICA_ID": self.replica_id,
        }
