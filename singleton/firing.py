"""One firing, step by step (DESIGN "One firing"): the policy that every backend shares.

1. Too late (older than ``misfire_grace``) → a ``skipped``/``misfired`` row, nothing runs.
2. Jitter, then acquire and claim in one step. A busy lock: ``efficiency`` skips the firing;
   ``singleton`` and ``ownership`` stand by until the lock frees, the firing is done, or the
   grace ends — and keep standing by while the firing runs elsewhere, to take it over if
   that owner dies.
3. The claim says what happened to this firing before: nothing → run attempt 1; done → a
   dedup; an orphan (running under an older token, interrupted, abandoned) → ``on_orphan``;
   failed → retry while attempts remain.
4. The job runs under a :class:`~singleton.lease.LeaseKeeper`; losing the lease, the
   timeout and shutdown all stop it through the context's ``cancel``.
5. The outcome is written only under the claim's token, and the lease released in the same
   step (after ``lock_at_least_for``).
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from singleton.backends.base import (
    ABANDONED,
    FAILED,
    INTERRUPTED,
    LOST_LEASE,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    TIMED_OUT,
    Attempt,
    Backend,
    Claim,
    Lease,
    Outcome,
    Run,
    new_owner,
)
from singleton.clock import Clock
from singleton.context import Cancel, JobContext
from singleton.errors import BackendError, BackendUnavailable, LeaseLost
from singleton.events import Events
from singleton.jobs import Job
from singleton.lease import LeaseKeeper
from singleton.pausing import PauseWatch
from singleton.schedule import manual_run_id, run_id
from singleton.targets import Result

#: States of a previous attempt after which the firing is done.
DONE = frozenset({SUCCEEDED, SKIPPED})
#: States that mean the job never finished on its own: the owner died or was stopped.
ORPHANED = frozenset({RUNNING, INTERRUPTED, ABANDONED})
#: States that a retry may follow, while attempts remain.
RETRYABLE = frozenset({FAILED, TIMED_OUT, LOST_LEASE})
#: How many of a job's latest attempts the first owner in a process looks through for
#: orphans of earlier firings (:meth:`Firer._close_orphans`).
ORPHAN_SCAN = 20

#: How much of a command's output goes into its log line (all of it up to output_limit is
#: captured; the line stays readable).
OUTPUT_IN_LOG = 1000

#: How long a standby blocks in one wait before it looks again (and at shutdown).
STANDBY_POLL = 0.5
#: The longest standby wait where the coordinator notifies releases (bounded, so a
#: standby still gives up promptly at shutdown).
MAX_STANDBY_PAUSE = 2.0


class TokenMemory:
    """The highest token this replica has seen per lock. Kept in memory on purpose: it must
    survive exactly the failure it detects, a coordinator that lost its data."""

    def __init__(self) -> None:
        self._highest: dict[str, int] = {}
        self._lock = threading.Lock()

    def observe(self, name: str, token: int) -> int | None:
        """Remember ``token``; if it is not above every token seen, return the highest."""
        with self._lock:
            highest = self._highest.get(name, 0)
            if token <= highest:
                return highest
            self._highest[name] = token
            return None

    def highest(self, name: str) -> int:
        with self._lock:
            return self._highest.get(name, 0)


@dataclass
class Owned:
    """A firing this replica owns: what shutdown needs to stop it and let go."""

    run: Run
    keeper: LeaseKeeper
    cancel: Cancel
    acquired_at: float
    attempt: int = 0
    #: How the last attempt this replica ran ended (None: it ran none).
    outcome: Outcome | None = None
    #: Set after a token regression: the attempt voided (0 if none), to acquire again.
    voided: int | None = None
    #: ``overlap: allow``: the lock was let go right after the claim, so the job's next
    #: firing can start while this one runs; the attempt row alone fences the finish.
    unleased: bool = False


class Firer:
    """Runs firings for one replica; one call of :meth:`fire` per firing, in its own thread."""

    def __init__(
        self,
        backend: Backend,
        replica: str,
        clock: Clock,
        events: Events,
        stopping: threading.Event,
        pauses: PauseWatch | None = None,
    ) -> None:
        self.backend = backend
        self.replica = replica
        self.clock = clock
        self.events = events
        self.stopping = stopping
        self.pauses = pauses
        self.tokens = TokenMemory()
        self._owned: dict[str, Owned] = {}
        self._owned_lock = threading.Lock()
        self._swept: set[str] = set()

    # -- what the runner asks -----------------------------------------------------------------

    def running(self, job: str) -> bool:
        """Whether an attempt of ``job`` runs here now (not merely a standby, or a check
        that the firing is done)."""
        with self._owned_lock:
            return any(item.run.job == job and item.attempt for item in self._owned.values())

    def cancel(self, job: str) -> int:
        """Stop this replica's running firings of ``job`` because a newer firing came
        (``overlap: cancel_other``); they end ``interrupted`` with reason ``overlap``.
        Returns how many were stopped."""
        with self._owned_lock:
            owned = [item for item in self._owned.values() if item.run.job == job]
        for item in owned:
            item.cancel.set(INTERRUPTED, cause="overlap")
        return len(owned)

    def held(self) -> dict[str, dict[str, object]]:
        """The leases this replica holds now: per job, the run, token and lease left."""
        with self._owned_lock:
            owned = list(self._owned.values())
        return {
            item.run.job: {
                "run_id": item.run.run_id,
                "token": item.keeper.lease.token,
                "lease_left": round(item.keeper.remaining(), 3),
            }
            for item in owned
        }

    def interrupt_all(self) -> None:
        """Stop every running job (shutdown grace is over): their attempts end ``interrupted``."""
        with self._owned_lock:
            owned = list(self._owned.values())
        for item in owned:
            item.cancel.set(INTERRUPTED)

    def abandon_all(self) -> None:
        """Last resort at exit, for jobs that ignored the interrupt (a sync function cannot be
        killed): record them ``interrupted`` and release, so a standby takes over at once."""
        with self._owned_lock:
            owned = list(self._owned.values())
            self._owned.clear()
        for item in owned:
            lease = item.keeper.stop()
            try:
                if item.attempt:
                    self.backend.finish_and_release(
                        item.run,
                        lease,
                        item.attempt,
                        Outcome(INTERRUPTED, "shutdown: the job did not stop"),
                    )
                else:
                    self.backend.release(lease)
            except BackendError as exc:
                self.events.emit("backend_error", item.run.job, item.run.run_id, error=str(exc))

    # -- the firing -----------------------------------------------------------------------------

    def fire(self, job: Job, scheduled_at: datetime, *, late_ok: bool = False) -> Outcome | None:
        """Run the firing of ``job`` at ``scheduled_at`` if this replica wins it; how the
        last attempt run here ended, or None when none ran here.

        ``late_ok``: the firing was accepted in time and runs late on purpose (a buffered
        overlap, a catch-up): no misfire check, and standbys get the whole grace from now.
        """
        run = Run(job.name, run_id(job.name, scheduled_at), scheduled_at)
        late = 0.0 if late_ok else (self.clock.now() - scheduled_at).total_seconds()
        if late > job.misfire_grace:
            self._skip(run, "misfired", late=round(late, 3))
            return None
        if self._paused(job, run):
            return None
        give_up = self.clock.monotonic() + job.misfire_grace - max(0.0, late)
        if job.jitter and self.clock.wait(self.stopping, random.uniform(0, job.jitter)):
            return None
        return self._run(job, run, give_up)

    def backfill(self, job: Job, scheduled_at: datetime) -> Outcome | None:
        """Run a past firing that the ledger does not show as succeeded (``singleton
        backfill``): whatever ``on_orphan``, ``max_attempts`` or a skip said, an operator
        asked for it. Waits for the lock up to the job's ``misfire_grace``."""
        run = Run(job.name, run_id(job.name, scheduled_at), scheduled_at)
        return self._run(job, run, self.clock.monotonic() + job.misfire_grace, forced=True)

    def _paused(self, job: Job, run: Run) -> bool:
        pause = self.pauses.get(job.name) if self.pauses is not None else None
        if pause is None:
            return False
        self._skip(run, "paused", paused_by=pause.by, note=pause.note)
        return True

    def trigger(self, job: Job) -> Outcome | None:
        """A manual run now, under the job's lock, with a ``manual`` run ID of its own."""
        now = self.clock.now()
        run = Run(job.name, manual_run_id(job.name), now)
        return self._run(job, run, self.clock.monotonic() + job.misfire_grace)

    def _run(self, job: Job, run: Run, give_up: float, forced: bool = False) -> Outcome | None:
        voided = 0
        for _ in range(3):  # a token regression is repaired and retried, a bounded number of times
            got = self._acquire(job, run, give_up)
            if got is None:
                return None
            owned = self._own(job, run, *got, voided=voided, forced=forced)
            if owned.voided is None:
                return owned.outcome
            voided = owned.voided
        return None

    def _skip(self, run: Run, reason: str, **fields: Any) -> None:
        written = self.backend.skip(run, reason, self.replica)
        self.events.emit("skipped", run.job, run.run_id, reason=reason, recorded=written, **fields)

    def _acquire(self, job: Job, run: Run, give_up: float) -> tuple[Lease, Claim] | None:
        """Acquire and claim, standing by as the job's mode says; None when this replica
        has nothing more to do for this firing."""
        standing_by = False
        started = self.clock.monotonic()
        while not self.stopping.is_set():
            try:
                got = self.backend.acquire_and_claim(run, job.lock_ttl, new_owner(self.replica))
            except BackendUnavailable as exc:
                # An outage shorter than the grace must not drop this firing: try again.
                if self.clock.monotonic() >= give_up:
                    raise
                self.events.emit("backend_error", run.job, run.run_id, error=str(exc))
                self.clock.wait(self.stopping, STANDBY_POLL)
                continue
            waited = round(self.clock.monotonic() - started, 6)
            if got is not None:
                self.events.emit("acquired", job.name, run.run_id, got[0].token, waited=waited)
                return got
            # Under ``overlap: allow`` the lock is held only while a firing is claimed, and
            # perhaps for another firing than this one: wait for it instead of skipping.
            if job.mode == "efficiency" and job.overlap != "allow":
                self.events.emit(
                    "skipped", run.job, run.run_id, reason="busy", recorded=False, waited=waited
                )
                return None
            if not standing_by:
                standing_by = True
                self.events.emit("standby", run.job, run.run_id)
            now = self.clock.monotonic()
            if now >= give_up:
                latest = self.backend.attempts(run.run_id)
                if not latest:
                    self._skip(run, "overlap")
                    return None
                if latest[0].state != RUNNING:
                    return None
                # The firing started in time and runs elsewhere: keep watching its owner.
                give_up = now + job.lock_ttl
            pause = min(self._standby_pause(job), max(0.0, give_up - now))
            pause *= random.uniform(0.8, 1.0)
            try:
                self.backend.wait(job.name, pause)
            except BackendUnavailable:
                self.clock.wait(self.stopping, pause)  # the next acquire reports the outage
        return None

    def _standby_pause(self, job: Job) -> float:
        """How long a standby waits between tries. Where the coordinator wakes waiters on
        release, longer (a third of the TTL): the wait ends early on a release, and only an
        owner's death, noticed at its lease's expiry, costs the full pause."""
        if self.backend.capabilities.notify:
            return max(STANDBY_POLL, min(job.lock_ttl / 3, MAX_STANDBY_PAUSE))
        return STANDBY_POLL

    def _own(
        self, job: Job, run: Run, lease: Lease, claim: Claim, voided: int, forced: bool
    ) -> Owned:
        """Hold the lease from acquisition to release. After a token regression the result's
        ``voided`` asks the caller to acquire again; the voided attempt is then rerun
        whatever ``on_orphan`` says, since it never ran."""
        cancel = Cancel()
        keeper = LeaseKeeper(
            self.backend,
            lease,
            self.clock,
            on_lost=lambda reason: self._lost(run, lease.token, cancel, reason),
            on_renewal_failed=lambda error: self.events.emit(
                "renewal_failed", run.job, run.run_id, lease.token, error=error
            ),
            on_renewed=lambda renewed: self.events.emit(
                "renewed", run.job, run.run_id, renewed.token
            ),
        ).start()
        owned = Owned(run, keeper, cancel, acquired_at=self.clock.monotonic())
        with self._owning(owned):
            # Either voids the attempt before its job starts; the caller acquires again.
            late = self._granted_late(run, keeper, claim)
            if late or not self._tokens_ok(job, run, keeper, claim):
                owned.voided = claim.attempt.attempt if claim.attempt else 0
                return owned
            try:
                owned.outcome = self._work(job, run, owned, claim, voided, forced)
                self._close_orphans(job, owned)
            except LeaseLost as exc:
                self.events.emit("lost", run.job, run.run_id, lease.token, reason=str(exc))
            finally:
                self._let_go(job, owned, owned.outcome)
        return owned

    @contextmanager
    def _owning(self, owned: Owned) -> Iterator[None]:
        with self._owned_lock:
            self._owned[owned.run.run_id] = owned
        try:
            yield
        finally:
            with self._owned_lock:
                if self._owned.get(owned.run.run_id) is owned:
                    del self._owned[owned.run.run_id]
            owned.keeper.stop()

    def _let_go(self, job: Job, owned: Owned, outcome: Outcome | None) -> None:
        """Write the outcome (under the claim's token) and release, in one step where the
        backend can; after ``lock_at_least_for`` has passed since acquisition."""
        lease = owned.keeper.stop()
        keep_for = max(0.0, job.lock_at_least_for - (self.clock.monotonic() - owned.acquired_at))
        try:
            if outcome is None or owned.attempt == 0:
                self.backend.release(lease, keep_for)
            elif owned.unleased:
                if not self.backend.finish(owned.run, lease, owned.attempt, outcome):
                    self.events.emit(
                        "finish_refused",
                        job.name,
                        owned.run.run_id,
                        lease.token,
                        state=outcome.state,
                    )
                return
            elif not self.backend.finish_and_release(
                owned.run, lease, owned.attempt, outcome, keep_for
            ):
                self.events.emit(
                    "finish_refused", job.name, owned.run.run_id, lease.token, state=outcome.state
                )
        except BackendError as exc:
            self.events.emit(
                "backend_error", job.name, owned.run.run_id, lease.token, error=str(exc)
            )
            return
        held = round(self.clock.monotonic() - owned.acquired_at, 6)
        self.events.emit("released", job.name, owned.run.run_id, lease.token, held=held)

    def _lost(self, run: Run, token: int, cancel: Cancel, reason: str) -> None:
        self.events.emit("lost", run.job, run.run_id, token, reason=reason)
        cancel.set(LOST_LEASE)

    def _granted_late(self, run: Run, keeper: LeaseKeeper, claim: Claim) -> bool:
        """A grant that came after its deadline (the keeper lost it at start): someone else
        may hold the lock by now. Void the attempt before its job starts and let go."""
        if not keeper.lost:
            return False
        try:
            self._void(run, keeper.lease, claim, "the lease ended before its grant arrived")
            self.backend.release(keeper.lease)
        except BackendError as exc:
            self.events.emit("backend_error", run.job, run.run_id, error=str(exc))
        return True

    def _tokens_ok(self, job: Job, run: Run, keeper: LeaseKeeper, claim: Claim) -> bool:
        """Tokens never go backwards: a token no higher than one seen before (here, or in the
        ledger) means the coordinator lost data. Refuse the run, raise the counter, retry."""
        lease = keeper.lease
        highest = self.tokens.observe(job.name, lease.token)
        recorded = claim.highest
        if highest is None and recorded < lease.token:
            return True
        above = max(highest or 0, recorded)
        self.events.emit("token_regression", job.name, run.run_id, lease.token, highest=above)
        keeper.stop()
        self._void(run, lease, claim, "token regression")
        self.backend.evict(job.name, above)  # lets go of our lease and moves the counter
        return False

    def _void(self, run: Run, lease: Lease, claim: Claim, why: str) -> None:
        """Close the attempt a claim started, before its job ran, as ``abandoned``: the
        caller acquires again, and :meth:`_decide` reruns it whatever ``on_orphan`` says."""
        if claim.attempt is not None:
            self.backend.finish(run, lease, claim.attempt.attempt, Outcome(ABANDONED, why))

    def _work(
        self, job: Job, run: Run, owned: Owned, claim: Claim, voided: int, forced: bool
    ) -> Outcome | None:
        """Decide from the claim, run, retry in place; the last attempt's outcome, if any ran."""
        while True:
            if claim.attempt is not None:
                owned.attempt = claim.attempt.attempt
                if job.overlap == "allow":
                    self._unlock(owned)
                self.events.emit(
                    "claimed",
                    run.job,
                    run.run_id,
                    claim.attempt.token,
                    attempt=claim.attempt.attempt,
                    previous=claim.latest.state if claim.latest else None,
                )
                outcome = self._execute(job, run, owned, claim.attempt)
                if owned.unleased or not self._retry_after(job, outcome, claim.attempt, owned):
                    return outcome
                if not self.backend.finish(run, owned.keeper.lease, owned.attempt, outcome):
                    self.events.emit(
                        "finish_refused", run.job, run.run_id, owned.keeper.lease.token
                    )
                    return None
                claim = self.backend.claim(run, owned.keeper.lease, seen=claim.attempt.attempt)
                continue
            latest = claim.latest
            assert latest is not None, "a claim that wrote nothing returns what it found"
            start = self._decide(job, run, owned.keeper.lease, latest, voided, forced)
            if start is None:
                return None
            claim = self.backend.claim(run, owned.keeper.lease, seen=latest.attempt, start=start)
            if not start:
                return None

    def _close_orphans(self, job: Job, owned: Owned) -> None:
        """The first time this process holds ``job``'s lock, mark ``abandoned`` the attempts
        of earlier firings still ``running`` under a lower token. Their owners lost the lock,
        and nobody else would ever close them: a takeover only looks at its own firing, so
        after a lone replica was killed mid-run, or a whole fleet restarted, ``history``
        would show them running for good. After the job ran, so its start waits for nothing;
        never under ``overlap: allow``, whose attempts run without the lock by design."""
        with self._owned_lock:
            if owned.unleased or job.overlap == "allow" or job.name in self._swept:
                return
            self._swept.add(job.name)
        lease = owned.keeper.lease
        try:
            for attempt in self.backend.history(job.name, ORPHAN_SCAN):
                if attempt.state != RUNNING or (attempt.token or 0) >= lease.token:
                    continue
                stale = Run(job.name, attempt.run_id, attempt.scheduled_at)
                was = self.backend.claim(stale, lease, seen=attempt.attempt, start=False).latest
                if was is None or was.attempt != attempt.attempt or was.state != RUNNING:
                    continue  # it finished after all, or someone else closed it
                self.events.emit(
                    ABANDONED,
                    job.name,
                    attempt.run_id,
                    lease.token,
                    attempt=attempt.attempt,
                    previous_token=attempt.token,
                    previous_replica=attempt.replica,
                )
        except BackendError as exc:
            self.events.emit("backend_error", job.name, owned.run.run_id, error=str(exc))

    def _start(self, job: Job, run: Run, ctx: JobContext) -> Result:
        """Run the target under the job's ``timeout``."""
        timer = None
        if job.timeout is not None:
            timer = threading.Timer(job.timeout, ctx.cancel.set, (TIMED_OUT,))
            timer.daemon = True
            timer.start()
        self.events.emit("started", job.name, run.run_id, ctx.token, attempt=ctx.attempt)
        try:
            return job.target.run(ctx)
        finally:
            if timer is not None:
                timer.cancel()

    def _unlock(self, owned: Owned) -> None:
        """``overlap: allow``: let go of the lock once the firing is claimed, so the next
        firing (here or elsewhere) can start while this one runs. Tokens stay on the job's
        one counter, so they still order the writes of firings that overlap."""
        lease = owned.keeper.stop()
        owned.unleased = True
        try:
            self.backend.release(lease)
        except BackendError as exc:
            # Not fatal: the lease runs out at its TTL.
            self.events.emit("backend_error", owned.run.job, owned.run.run_id, error=str(exc))

    def _decide(
        self, job: Job, run: Run, lease: Lease, latest: Attempt, voided: int, forced: bool
    ) -> bool | None:
        """What to do about a firing that has an attempt already: True to start a new
        attempt, False to close an orphan without running, None to leave it as it is."""
        if latest.state == ABANDONED and latest.attempt == voided:
            return True
        if forced and latest.state != SUCCEEDED:
            self.events.emit("backfilled", run.job, run.run_id, lease.token, previous=latest.state)
            return True
        # A cancelled firing is done; so is one running under ``allow``, which holds no
        # lease by design and so cannot be told from an orphan.
        running_unleased = job.overlap == "allow" and latest.state == RUNNING
        if latest.state in DONE or latest.reason == "overlap" or running_unleased:
            self.events.emit(
                "skipped",
                run.job,
                run.run_id,
                lease.token,
                reason="duplicate",
                previous=latest.state,
            )
            return None
        if latest.state in ORPHANED:
            self.events.emit(
                "taken_over",
                run.job,
                run.run_id,
                lease.token,
                previous=latest.state,
                previous_token=latest.token,
                previous_replica=latest.replica,
                on_orphan=job.on_orphan,
            )
            return job.on_orphan == "rerun"
        if latest.attempt < job.max_attempts:
            return True
        self.events.emit("skipped", run.job, run.run_id, lease.token, reason="attempts_exhausted")
        return None

    def _retry_after(self, job: Job, outcome: Outcome, attempt: Attempt, owned: Owned) -> bool:
        """Whether to retry in place (holding the lease) after ``retry_backoff``."""
        if outcome.state not in (FAILED, TIMED_OUT) or attempt.attempt >= job.max_attempts:
            return False
        if owned.cancel.is_set() or owned.keeper.lost:
            return False
        return not self.clock.wait(self.stopping, job.retry_backoff) and not owned.keeper.lost

    def _execute(self, job: Job, run: Run, owned: Owned, attempt: Attempt) -> Outcome:
        """One attempt. It has its own cancel, fed by the ownership's (lease lost, shutdown)
        and by its own timeout, so a timed-out attempt does not stop the retry after it."""
        token = owned.keeper.lease.token
        cancel = Cancel()
        owned.cancel.on_set(lambda reason: cancel.set(reason, owned.cancel.cause))
        ctx = JobContext(
            job=job.name,
            run_id=run.run_id,
            attempt=attempt.attempt,
            scheduled_at=run.scheduled_at,
            token=token,
            replica_id=self.replica,
            cancel=cancel,
            lease_remaining=(lambda: math.inf) if owned.unleased else owned.keeper.remaining,
        )
        started = self.clock.monotonic()
        owned.keeper.check()  # a deadline passed unnoticed sets the cancel (lost_lease) now
        if cancel.is_set():
            # The lease was lost (or shutdown came) between the claim and now: the job could
            # only overlap a new owner's run, so it never starts.
            result = Result(ok=False, error=f"never started: {cancel.reason}")
        else:
            result = self._start(job, run, ctx)
        state = cancel.reason or (SUCCEEDED if result.ok else FAILED)
        cause = cancel.cause
        error = None if state == SUCCEEDED else (result.error or state)
        if cause == "overlap":
            error = "cancelled: a newer firing came (overlap: cancel_other)"
        fields: dict[str, Any] = {"attempt": attempt.attempt}
        fields["duration"] = round(self.clock.monotonic() - started, 3)
        if error:
            fields["error"] = error
        if result.output.strip():
            fields["output"] = result.output.strip()[-OUTPUT_IN_LOG:]
        self.events.emit(state, job.name, run.run_id, token, exc=result.exception, **fields)
        return Outcome(state, error, reason=cause)
