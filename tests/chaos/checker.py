"""The offline checker: a verdict from the oracle's write log, the ledger's history and the
nemesis log, trusting none of the runner's own claims.

Pure functions over plain records, so it can be unit-tested on hand-written histories
(tests/chaos/test_checker.py) and rerun on a kept run directory. Checks, numbered as in
issue #10:

1. every expected firing in the window (computed here, by a walk over whole seconds, not by
   the product's scheduler) has exactly one applied write; a miss is *explained* when a fault
   was active near its fire time, or when the ledger recorded it skipped for ``overlap`` by the
   replica the oracle shows still running the previous firing (an *overrun*, the documented
   ``overlap: skip`` policy on a loaded machine); its cause names the fault and the ledger's
   and logs' evidence;
2. no applied write carries a token lower than one applied before it (per job, in the
   oracle's order); refused stale writes are counted;
3. how often a firing ran more than once (writes under more than one token), per fault;
4. the ledger agrees with the oracle: one ``succeeded`` attempt per firing that was applied,
   and no ``succeeded`` attempt for a firing that never wrote;
5. nothing left behind (the harness passes in what its leak scan found).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

#: Attribution of firings to faults with no fault near: the report's row name.
QUIET = "none"
#: A write this much earlier than its firing's instant started early (I9, informational).
EARLY = 0.5
#: A run that wrote this little before the next firing may still have been running then.
OVERRUN = 0.5


@dataclass(frozen=True)
class Write:
    """One row of the oracle's log: applied or refused (``reason``), at real ``mono``."""

    seq: int
    job: str
    run_id: str
    token: int
    replica: str
    applied: bool
    reason: str | None
    mono: float


@dataclass(frozen=True)
class Attempt:
    """One attempt from ``singleton history --json``: only what the checker reads."""

    run_id: str
    state: str
    token: int | None
    replica: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class FaultSpan:
    """A fault's real monotonic span, as the nemesis logged it."""

    kind: str
    start: float
    end: float


@dataclass(frozen=True)
class Window:
    """The checked firings: jobs (name -> period in seconds) firing in [start, end] (Unix
    seconds); ``wall0``/``mono0`` pair the harness's real clocks, to place firings on the
    monotonic line; ``recovery`` is how long after a fault its effects are excused."""

    jobs: dict[str, int]
    start: float
    end: float
    wall0: float
    mono0: float
    recovery: float

    def mono(self, wall: float) -> float:
        return self.mono0 + (wall - self.wall0)


@dataclass
class FaultRow:
    """The report's numbers for one fault kind (or :data:`QUIET`)."""

    injected: int = 0
    firings: int = 0
    misses: int = 0
    duplicates: int = 0
    stale_refused: int = 0
    stale_applied: int = 0
    early: int = 0


@dataclass
class Verdict:
    firings: int = 0
    applied: int = 0
    misses: list[tuple[str, str]] = field(default_factory=list)
    unexplained: list[tuple[str, str]] = field(default_factory=list)
    stale_applied: list[Write] = field(default_factory=list)
    stale_refused: int = 0
    duplicate_refused: int = 0
    duplicates: list[str] = field(default_factory=list)
    ledger_disagreements: list[tuple[str, str]] = field(default_factory=list)
    explained_disagreements: list[tuple[str, str]] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    per_fault: dict[str, FaultRow] = field(default_factory=dict)

    def row(self, kind: str | None) -> FaultRow:
        return self.per_fault.setdefault(kind or QUIET, FaultRow())

    def violations(self, fencing: bool) -> list[str]:
        """What fails the run: on a backend that claims fencing, any stale write applied,
        unexplained miss or ledger disagreement; on any backend, a leak. (A backend without
        fencing has its violations counted and reported, as predicted, not failed.)"""
        found = [f"leak: {leak}" for leak in self.leaks]
        if fencing:
            found += [f"stale write applied: {w}" for w in self.stale_applied]
            found += [f"unexplained miss: {run} ({why})" for run, why in self.unexplained]
            found += [f"ledger: {run} {why}" for run, why in self.ledger_disagreements]
        return found


def fire_instants(period: int, start: float, end: float) -> list[int]:
    """Whole multiples of ``period`` since the epoch in [start, end]: an ``every:`` job's
    firings, found by walking seconds (independent of the product's schedule code)."""
    return [s for s in range(int(start), int(end) + 1) if s >= start and s % period == 0]


def run_id(job: str, instant: int) -> str:
    return f"{job}@{datetime.fromtimestamp(instant, UTC):%Y-%m-%dT%H:%M:%SZ}"


def expected_runs(window: Window) -> dict[str, float]:
    """Run ID -> fire instant (Unix seconds) for every firing in the window."""
    return {
        run_id(job, instant): float(instant)
        for job, period in window.jobs.items()
        for instant in fire_instants(period, window.start, window.end)
    }


def fault_at(mono: float, faults: Sequence[FaultSpan], recovery: float) -> str | None:
    """The kind of the latest fault active at ``mono`` or ended less than ``recovery`` ago."""
    near = [f for f in faults if f.start - 1.0 <= mono <= f.end + recovery]
    return max(near, key=lambda f: f.start).kind if near else None


def _overrun(
    run: str,
    instant: float,
    window: Window,
    attempts: Sequence[Attempt],
    by_run: Mapping[str, Sequence[Write]],
) -> str | None:
    """Explain a miss by the product's ``overlap: skip`` policy, only when the ledger and the
    oracle agree: the skip was recorded by the replica whose write applied the job's previous
    firing, and that write landed less than :data:`OVERRUN` before this one's instant (or
    after it) — so that replica was still busy running it. A skip recorded by any other
    replica is not an overrun (see docs/reliability.md, finding 3)."""
    skippers = {a.replica for a in attempts if a.state == "skipped" and a.reason == "overlap"}
    if not skippers:
        return None
    job = run.split("@", 1)[0]
    previous = run_id(job, int(instant) - window.jobs[job])
    ran = [w for w in by_run.get(previous, ()) if w.applied and w.replica in skippers]
    if ran and max(w.mono for w in ran) >= window.mono(instant) - OVERRUN:
        return "overrun"
    return None


def _ledger_evidence(attempts: Sequence[Attempt]) -> str:
    if not attempts:
        return "no ledger record"
    states = Counter(a.state if a.reason is None else f"{a.state}:{a.reason}" for a in attempts)
    return "ledger " + ",".join(f"{s}x{n}" if n > 1 else s for s, n in sorted(states.items()))


def check(
    window: Window,
    writes: Iterable[Write],
    history: Iterable[Attempt],
    faults: Sequence[FaultSpan],
    leaks: Sequence[str] = (),
    notes: Mapping[str, str] | None = None,
) -> Verdict:
    """``notes``: run ID -> what the replicas' logs say of it (a skip not recorded in the
    ledger), added to a miss's cause; evidence only, it excuses nothing."""
    verdict = Verdict(leaks=list(leaks))
    notes = notes or {}
    writes = sorted(writes, key=lambda w: (w.job, w.seq))
    spans = sorted(faults, key=lambda f: f.start)
    for span in spans:
        verdict.row(span.kind).injected += 1
    by_run: dict[str, list[Write]] = defaultdict(list)
    for write in writes:
        by_run[write.run_id].append(write)
    ledger: dict[str, list[Attempt]] = defaultdict(list)
    for attempt in history:
        ledger[attempt.run_id].append(attempt)
    _check_fencing(verdict, writes, window, spans)
    for run, instant in sorted(expected_runs(window).items(), key=lambda item: item[1]):
        cause = fault_at(window.mono(instant), spans, window.recovery)
        if cause is None and not any(w.applied for w in by_run[run]):
            cause = _overrun(run, instant, window, ledger[run], by_run)
        row = verdict.row(cause)
        row.firings += 1
        verdict.firings += 1
        evidence = _ledger_evidence(ledger[run]) + (f"; {notes[run]}" if run in notes else "")
        _check_firing(verdict, row, run, instant, cause, by_run[run], ledger[run], window, evidence)
    return verdict


def _check_fencing(
    verdict: Verdict, writes: Sequence[Write], window: Window, spans: Sequence[FaultSpan]
) -> None:
    """Check 2, over every write the oracle saw (not only the window's: a stale write after
    the window still corrupts)."""
    highest: dict[str, int] = {}
    for write in writes:
        row = verdict.row(fault_at(write.mono, spans, window.recovery))
        if write.applied:
            if write.token < highest.get(write.job, write.token):
                verdict.stale_applied.append(write)
                row.stale_applied += 1
            highest[write.job] = max(highest.get(write.job, write.token), write.token)
        elif write.reason == "StaleToken":
            verdict.stale_refused += 1
            row.stale_refused += 1
        else:
            verdict.duplicate_refused += 1


def _check_firing(
    verdict: Verdict,
    row: FaultRow,
    run: str,
    instant: float,
    cause: str | None,
    writes: Sequence[Write],
    attempts: Sequence[Attempt],
    window: Window,
    evidence: str,
) -> None:
    applied = [w for w in writes if w.applied]
    succeeded = [a for a in attempts if a.state == "succeeded"]
    if applied:
        verdict.applied += 1
    else:
        row.misses += 1
        why = f"{cause or 'no fault near'}; {evidence}"
        verdict.misses.append((run, why))
        if cause is None:
            verdict.unexplained.append((run, why))
    if len(applied) > 1:
        verdict.ledger_disagreements.append((run, f"{len(applied)} applied writes"))
    if len({w.token for w in writes}) > 1:
        row.duplicates += 1
        verdict.duplicates.append(run)
    if any(w.mono < window.mono(instant) - EARLY for w in writes):
        row.early += 1
    _check_ledger(verdict, run, cause, applied, succeeded)


def _check_ledger(
    verdict: Verdict,
    run: str,
    cause: str | None,
    applied: Sequence[Write],
    succeeded: Sequence[Attempt],
) -> None:
    """Check 4. Two successes, or a success with nothing applied, is never excusable; an
    applied firing the ledger does not call succeeded is excused only near a fault (an owner
    killed between its write and its finish, a coordinator that lost its data)."""
    if len(succeeded) > 1:
        verdict.ledger_disagreements.append((run, f"{len(succeeded)} succeeded attempts"))
    elif succeeded and not applied:
        verdict.ledger_disagreements.append((run, "succeeded in the ledger, never applied"))
    elif applied and not succeeded:
        why = "applied, not succeeded in the ledger"
        if cause is None:
            verdict.ledger_disagreements.append((run, why))
        else:
            verdict.explained_disagreements.append((run, f"{why} ({cause})"))
