"""``memory://``: the whole contract in one process's memory, for tests and trying things out.

Expiry runs on the injected clock's monotonic time, so the contract suite can drive it with
a fake clock. Nothing survives the process: never a choice for real jobs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from datetime import datetime

from singleton.backends.base import (
    ABANDONED,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    Attempt,
    Capabilities,
    Claim,
    Composed,
    Holder,
    Lease,
    Outcome,
    Run,
    lease_deadline,
    owner_replica,
)
from singleton.clock import SYSTEM_CLOCK, Clock
from singleton.errors import LeaseLost


@dataclass
class _Slot:
    owner: str | None = None
    token: int = 0
    expires: float = 0.0


class MemoryBackend(Composed):
    """Locks and ledger in dicts guarded by one condition variable."""

    capabilities = Capabilities(fencing=True, shared=False, notify=True)

    def __init__(self, url: str = "memory://", clock: Clock = SYSTEM_CLOCK) -> None:
        self.url = url
        self._clock = clock
        self._cond = threading.Condition()
        self._slots: dict[str, _Slot] = {}
        self._runs: dict[str, list[Attempt]] = {}
        self._order: list[Attempt] = []
        self._state: dict[str, tuple[str, float | None]] = {}

    def _held(self, slot: _Slot) -> bool:
        return slot.owner is not None and slot.expires > self._clock.monotonic()

    def _current(self, lease: Lease) -> _Slot:
        slot = self._slots.get(lease.name)
        if (
            slot is None
            or not self._held(slot)
            or slot.owner != lease.owner
            or slot.token != lease.token
        ):
            raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone")
        return slot

    def try_acquire(self, name: str, ttl: float, owner: str) -> Lease | None:
        sent = self._clock.monotonic()
        with self._cond:
            slot = self._slots.setdefault(name, _Slot())
            if self._held(slot):
                return None
            slot.owner, slot.token, slot.expires = owner, slot.token + 1, sent + ttl
            return Lease(name, owner, slot.token, ttl, lease_deadline(sent, ttl))

    def renew(self, lease: Lease) -> Lease:
        sent = self._clock.monotonic()
        with self._cond:
            slot = self._current(lease)
            slot.expires = sent + lease.ttl
        return lease.renewed(lease_deadline(sent, lease.ttl))

    def release(self, lease: Lease, keep_for: float = 0.0) -> None:
        with self._cond:
            try:
                slot = self._current(lease)
            except LeaseLost:
                return
            if keep_for > 0:
                slot.expires = min(slot.expires, self._clock.monotonic() + keep_for)
            else:
                slot.owner = None
            self._cond.notify_all()

    def holder(self, name: str) -> Holder | None:
        with self._cond:
            slot = self._slots.get(name)
            if slot is None or slot.owner is None or not self._held(slot):
                return None
            return Holder(name, slot.owner, slot.token, slot.expires - self._clock.monotonic())

    def wait(self, name: str, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)

    def evict(self, name: str, token_above: int = 0) -> int:
        with self._cond:
            slot = self._slots.setdefault(name, _Slot())
            slot.token = max(slot.token, token_above)
            slot.owner = None
            self._cond.notify_all()
            return slot.token

    def claim(self, run: Run, lease: Lease, *, seen: int = 0, start: bool = True) -> Claim:
        with self._cond:
            self._current(lease)
            rows = self._runs.setdefault(run.run_id, [])
            latest = rows[0] if rows else None
            highest = max((row.token or 0 for row in self._order if row.job == run.job), default=0)
            if (latest.attempt if latest else 0) != seen:
                return Claim(latest, None, highest)
            if latest is not None and latest.state == SUCCEEDED:
                return Claim(latest, None, highest)  # done: never a second run of a firing
            if latest is not None and latest.state == RUNNING:
                self._replace(
                    latest, replace(latest, state=ABANDONED, finished_at=self._clock.now())
                )
            if not start:
                return Claim(latest, None, highest)
            new = Attempt(
                run_id=run.run_id,
                job=run.job,
                attempt=seen + 1,
                state=RUNNING,
                token=lease.token,
                replica=owner_replica(lease.owner),
                scheduled_at=run.scheduled_at,
                started_at=self._clock.now(),
            )
            self._insert(new)
            return Claim(latest, new, highest)

    def finish(self, run: Run, lease: Lease, attempt: int, outcome: Outcome) -> bool:
        with self._cond:
            for row in self._runs.get(run.run_id, []):
                if row.attempt == attempt and row.state == RUNNING and row.token == lease.token:
                    done = replace(
                        row,
                        state=outcome.state,
                        error=outcome.error,
                        reason=outcome.reason,
                        finished_at=self._clock.now(),
                    )
                    self._replace(row, done)
                    return True
            return False

    def skip(self, run: Run, reason: str, replica: str) -> bool:
        with self._cond:
            if self._runs.get(run.run_id):
                return False
            now = self._clock.now()
            self._insert(
                Attempt(
                    run_id=run.run_id,
                    job=run.job,
                    attempt=1,
                    state=SKIPPED,
                    token=None,
                    replica=replica,
                    scheduled_at=run.scheduled_at,
                    finished_at=now,
                    reason=reason,
                )
            )
            return True

    def attempts(self, run_id: str) -> list[Attempt]:
        with self._cond:
            return list(self._runs.get(run_id, []))

    def history(self, job: str | None, limit: int) -> list[Attempt]:
        with self._cond:
            rows = [row for row in reversed(self._order) if job is None or row.job == job]
        return rows[:limit] if limit else rows

    def prune(self, before: datetime, keep: int) -> int:
        with self._cond:
            kept: list[Attempt] = []
            per_job: dict[str, int] = {}
            for row in reversed(self._order):
                per_job[row.job] = per_job.get(row.job, 0) + 1
                if row.state == RUNNING or (
                    row.scheduled_at >= before and per_job[row.job] <= keep
                ):
                    kept.append(row)
            gone = len(self._order) - len(kept)
            self._order = kept[::-1]
            self._runs = {}
            for row in kept:
                self._runs.setdefault(row.run_id, []).append(row)
            return gone

    def put(self, key: str, value: str, ttl: float | None = None) -> None:
        expires = None if ttl is None else self._clock.monotonic() + ttl
        with self._cond:
            self._state[key] = (value, expires)

    def scan(self, prefix: str) -> dict[str, str]:
        now = self._clock.monotonic()
        with self._cond:
            return {
                key: value
                for key, (value, expires) in self._state.items()
                if key.startswith(prefix) and (expires is None or expires > now)
            }

    def delete(self, key: str) -> None:
        with self._cond:
            self._state.pop(key, None)

    def close(self) -> None:
        """Nothing to close: the state lives as long as the object."""

    def _insert(self, row: Attempt) -> None:
        self._order.append(row)
        self._runs.setdefault(row.run_id, []).insert(0, row)

    def _replace(self, old: Attempt, new: Attempt) -> None:
        self._order[self._order.index(old)] = new
        rows = self._runs[old.run_id]
        rows[rows.index(old)] = new
