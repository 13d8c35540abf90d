"""The backend contract: what every coordinator must do, and nothing more.

A backend implements **atomic storage steps** only. Policy (dedup, takeover, retries, token
regression) lives once, in :mod:`singleton.firing`, so seven backends cannot disagree about
it. Contention is a value (``None``, a :class:`Claim`), never an exception; exceptions are
faults: :class:`~singleton.errors.BackendUnavailable` when the coordinator cannot be reached,
:class:`~singleton.errors.LeaseLost` when a lease is no longer ours.

Every backend passes the shared suite in :mod:`singleton.testing.contract` against a real
server process.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from singleton.clock import iso_z, parse_iso

#: The states an attempt can be in; ``skipped`` rows record firings that never ran.
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
TIMED_OUT = "timed_out"
LOST_LEASE = "lost_lease"
INTERRUPTED = "interrupted"
ABANDONED = "abandoned"
SKIPPED = "skipped"
TERMINAL_STATES = frozenset({SUCCEEDED, FAILED, TIMED_OUT, LOST_LEASE, INTERRUPTED, ABANDONED})
STATES = TERMINAL_STATES | {RUNNING, SKIPPED}

#: A lease's local deadline is cut short by this share of its TTL (plus 2 ms), measured from
#: the moment the acquire request was *sent*: the holder gives up before any server could
#: think the lease expired, whatever the drift between their clocks (node-redlock's 0.01).
DRIFT_FACTOR = 0.01
DRIFT_FLOOR = 0.002


def default_replica_id() -> str:
    """``{hostname}-{pid}``: unique on a host, readable in ``status``."""
    return f"{socket.gethostname()}-{os.getpid()}"


def new_owner(replica_id: str) -> str:
    """An owner string unique per acquisition, so a replica never mistakes an old lease of its
    own (from before a pause, say) for the one it holds now."""
    return f"{replica_id}:{secrets.token_hex(6)}"


def owner_replica(owner: str) -> str:
    """The replica part of an owner string made by :func:`new_owner`."""
    return owner.rsplit(":", 1)[0]


def lease_deadline(sent_at: float, ttl: float) -> float:
    """The local monotonic instant after which a lease acquired or renewed at ``sent_at``
    must be treated as gone."""
    return sent_at + ttl - (ttl * DRIFT_FACTOR + DRIFT_FLOOR)


@dataclass(frozen=True)
class Lease:
    """Ownership of a lock name for a TTL.

    ``deadline`` is on the local monotonic clock; a renewal returns a new ``Lease`` and the old
    one stays as it was (ShedLock's ``extend``), so a stale copy cannot look fresh.
    """

    name: str
    owner: str
    token: int
    ttl: float
    deadline: float

    def renewed(self, deadline: float) -> Lease:
        return replace(self, deadline=deadline)


@dataclass(frozen=True)
class Holder:
    """Who holds a lock now, as far as the coordinator knows."""

    name: str
    owner: str
    token: int
    expires_in: float | None


@dataclass(frozen=True)
class Run:
    """One firing of one job: the unit the ledger makes idempotent."""

    job: str
    run_id: str
    scheduled_at: datetime


@dataclass(frozen=True)
class Attempt:
    """One row of the ledger (the ``history --json`` object, field for field)."""

    run_id: str
    job: str
    attempt: int
    state: str
    token: int | None
    replica: str
    scheduled_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    reason: str | None = None
    error: str | None = None

    def to_record(self) -> dict[str, Any]:
        """The ``history --json`` object (DESIGN, "Contracts"); also how backends that keep
        documents (etcd, ZooKeeper) store an attempt."""
        return {
            "run_id": self.run_id,
            "job": self.job,
            "attempt": self.attempt,
            "state": self.state,
            "reason": self.reason,
            "token": self.token,
            "replica": self.replica,
            "scheduled_at": iso_z(self.scheduled_at),
            "started_at": iso_z(self.started_at, millis=True) if self.started_at else None,
            "finished_at": iso_z(self.finished_at, millis=True) if self.finished_at else None,
            "error": self.error,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Attempt:
        """The inverse of :meth:`to_record`, tolerant of what storage does to it: numbers
        as text (Redis, etcd), missing empty fields, times with any ISO-8601 offset."""

        def when(key: str) -> datetime | None:
            value = record.get(key)
            return parse_iso(value) if value else None

        token = record.get("token")
        return cls(
            run_id=record["run_id"],
            job=record["job"],
            attempt=int(record["attempt"]),
            state=record["state"],
            token=int(token) if token not in (None, "") else None,
            replica=record["replica"],
            scheduled_at=parse_iso(record["scheduled_at"]),
            started_at=when("started_at"),
            finished_at=when("finished_at"),
            reason=record.get("reason") or None,
            error=record.get("error") or None,
        )


@dataclass(frozen=True)
class Claim:
    """What a claim found and what it wrote.

    ``latest`` is the run's newest attempt *before* this claim (None for a new firing);
    ``attempt`` is the ``running`` attempt this claim wrote, or None when it wrote nothing
    because the run had moved on since the caller looked. ``highest`` is the highest token
    the ledger had recorded for the job before this claim: a lease token not above it means
    the lock's counter went backwards.
    """

    latest: Attempt | None
    attempt: Attempt | None
    highest: int = 0


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended, as :meth:`Ledger.finish` records it.

    ``reason`` says why, where the state alone does not: an attempt cancelled because a newer
    firing of its job arrived (overlap policy ``cancel_other``) ends ``interrupted`` with
    reason ``overlap``, so that nobody mistakes it for an orphan to take over. None leaves the
    attempt's ``reason`` null.
    """

    state: str
    error: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend can promise; the runner refuses a job whose mode needs more.

    ``fencing``: tokens strictly increase per lock name and survive a coordinator restart.
    ``shared``: replicas on different hosts can share it. ``notify``: standbys are woken by
    the coordinator on release instead of polling. ``min_ttl``: the shortest lease it grants.
    """

    fencing: bool
    shared: bool
    notify: bool
    min_ttl: float = 0.0
    #: Why ``fencing`` is False, for the one-line refusal of an ``ownership`` job.
    fencing_note: str = ""


@runtime_checkable
class LockBackend(Protocol):
    """Leases with fencing tokens, one lock per name."""

    capabilities: Capabilities

    def try_acquire(self, name: str, ttl: float, owner: str) -> Lease | None:
        """Take ``name`` for ``ttl`` seconds, or return None at once if someone holds it.

        The token of a granted lease is strictly greater than every token issued before for
        ``name``, including those of expired and released leases. ``owner`` is unique per
        acquisition (:func:`new_owner`).
        """
        ...

    def renew(self, lease: Lease) -> Lease:
        """Extend ``lease`` by its TTL from now; raise LeaseLost if it is no longer held by
        this owner with this token (expired, released, stolen). Must return or raise by
        ``lease.deadline``: the keeper judges the lease only between renewals, so a renewal
        that hangs (a paused server, a partition) would hide its loss."""
        ...

    def release(self, lease: Lease, keep_for: float = 0.0) -> None:
        """Let go of ``lease`` if it is still ours (compare owner and token; never remove
        another owner's lease). With ``keep_for`` > 0 the lease is shortened to expire that
        many seconds from now instead, never lengthened (``lock_at_least_for``). Releasing
        a lease already gone is not an error."""
        ...

    def holder(self, name: str) -> Holder | None:
        """The current holder of ``name``, or None if it is free."""
        ...

    def wait(self, name: str, timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when ``name`` may have been
        released. Spurious returns are allowed; callers re-check with try_acquire."""
        ...

    def evict(self, name: str, token_above: int = 0) -> int:
        """Remove whoever holds ``name`` and move its token counter to at least
        ``token_above`` (never down); return the counter. The evicted holder's next renewal
        fails and every later token is above its own. Used to repair a token regression and
        by ``unlock --force``."""
        ...


@runtime_checkable
class Ledger(Protocol):
    """The durable record of attempts that makes a firing idempotent."""

    def claim(self, run: Run, lease: Lease, *, seen: int = 0, start: bool = True) -> Claim:
        """Atomically, while ``lease`` is the current lease of ``run.job``: if the run's latest
        attempt number equals ``seen`` (0: no attempt) and that attempt has not ``succeeded``,
        mark it ``abandoned`` if it is still ``running``, and, if ``start``, write attempt
        ``seen + 1`` as ``running`` under the lease's token. Otherwise write nothing. Either
        way return the latest attempt as it was found. Raises LeaseLost if ``lease`` is not
        current.

        A ``succeeded`` latest attempt means the firing is done: nothing is written, whatever
        ``seen`` says. ``finish`` is fenced by the attempt row, not the lock, so an owner whose
        lease expired can still record success between a new owner's read (it saw
        ``running``) and its claim; the check is part of the same atomic step on the
        coordinator, never a read from the client before it. Any other state (``skipped``,
        ``failed``, ``timed_out``, ``interrupted``, ``abandoned``, ``lost_lease``) may be
        followed by a new attempt."""
        ...

    def finish(self, run: Run, lease: Lease, attempt: int, outcome: Outcome) -> bool:
        """Record how ``attempt`` ended (``outcome``'s state, error and reason, each None
        stored as null, and the time), only if it is ``running`` under ``lease``'s token.
        Returns False (and writes nothing) for a stale owner.

        The attempt row alone fences this write, atomically on the coordinator: its token and
        its ``running`` state, which a takeover ends by marking it ``abandoned``. The lease
        need not still be held: an ``overlap: allow`` job releases its lock right after the
        claim, and its outcome must still be recorded."""
        ...

    def skip(self, run: Run, reason: str, replica: str) -> bool:
        """Record a firing that never ran (``misfired``, ``paused``, ``overlap``) unless the
        run has any attempt already; True if this call wrote the row."""
        ...

    def attempts(self, run_id: str) -> list[Attempt]:
        """Every attempt of one run, newest first."""
        ...

    def history(self, job: str | None, limit: int) -> list[Attempt]:
        """Attempts newest first, of one job or all (``limit`` 0 = all)."""
        ...

    def prune(self, before: datetime, keep: int) -> int:
        """Delete attempts of firings scheduled before ``before``, and beyond the newest
        ``keep`` per job; return how many rows went. Running attempts are never pruned."""
        ...


@runtime_checkable
class SharedState(Protocol):
    """Small records every replica can read: fleet fingerprints now, operator switches
    (pause) next. Keys are ``namespace/name`` (``[A-Za-z0-9._@:/-]``, at most 256 bytes);
    values are text of at most 1 MiB. Last write wins; no ordering across keys."""

    def put(self, key: str, value: str, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``; with ``ttl`` it disappears that many seconds later
        (by the coordinator's clock where it has one; up to a second late is fine)."""
        ...

    def scan(self, prefix: str) -> dict[str, str]:
        """Every live key that starts with ``prefix`` (full keys), with its value."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; removing a missing key is not an error."""
        ...


class Backend(LockBackend, Ledger, SharedState, Protocol):
    """A coordinator providing both the lock and the ledger, with the fused fast paths.

    :class:`Composed` gives the fast paths by composition; a backend that can do each in one
    round trip (one Lua script, one SQL transaction) overrides them.
    """

    url: str

    def acquire_and_claim(self, run: Run, ttl: float, owner: str) -> tuple[Lease, Claim] | None:
        """try_acquire(run.job) then claim(run, lease, seen=0): None when the lock is busy."""
        ...

    def finish_and_release(
        self, run: Run, lease: Lease, attempt: int, outcome: Outcome, keep_for: float = 0.0
    ) -> bool:
        """finish() then release(); the release happens even when finish is refused."""
        ...

    def server_time(self) -> datetime | None:
        """The coordinator's wall clock (Redis ``TIME``, PostgreSQL ``now()``), for the
        clock-skew check: fire times come from local clocks. None where it has none."""
        ...

    def close(self) -> None:
        """Drop connections; leases held stay until they expire or are released."""
        ...


class Composed:
    """The fused fast paths as two calls, for backends that cannot fuse them; and no
    server clock, for backends that have none."""

    def server_time(self) -> datetime | None:
        return None

    def acquire_and_claim(
        self: Backend, run: Run, ttl: float, owner: str
    ) -> tuple[Lease, Claim] | None:
        lease = self.try_acquire(run.job, ttl, owner)
        if lease is None:
            return None
        try:
            return lease, self.claim(run, lease)
        except BaseException:
            # Nobody will use this lease: do not make the standbys wait out its TTL.
            self.release(lease)
            raise

    def finish_and_release(
        self: Backend, run: Run, lease: Lease, attempt: int, outcome: Outcome, keep_for: float = 0.0
    ) -> bool:
        try:
            return self.finish(run, lease, attempt, outcome)
        finally:
            self.release(lease, keep_for)
