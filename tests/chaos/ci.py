"""The CI size of a campaign, shared by the per-backend test files (one file per backend, so
pytest-xdist's ``--dist loadfile`` spreads them over both workers).

The seed is random per run and printed; ``CHAOS_SEED=N`` replays one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from tests.chaos.harness import Result, Spec, run_campaign

#: Seconds of faults per backend in CI: with set-up, settling and the checker, a campaign
#: costs about a minute of wall time.
DURATION = 30.0


def seed() -> int:
    return int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))


def campaign(backend: str, tmp_path: Path) -> Result:
    spec = Spec(backend=backend, seed=seed(), duration=DURATION, jobs=2)
    result = run_campaign(spec, tmp_path / backend)
    verdict = result.verdict
    print(  # noqa: T201 (the seed must reach the log, to replay a failure)
        f"chaos {backend} seed={spec.seed}: {verdict.firings} firings, {len(result.faults)}"
        f" faults, {len(verdict.misses)} misses, {len(verdict.duplicates)} fenced duplicates,"
        f" {verdict.stale_refused} stale refused, {len(verdict.stale_applied)} stale applied"
    )
    return result


#: A campaign must apply at least this many firings to say anything about fencing.
MIN_APPLIED = 10


def assert_holds(result: Result) -> None:
    """The invariants the backend claims, plus the harness's own sanity: faults were
    injected and firings applied (a campaign where nothing ran proves nothing). How many
    firings were missed is not asserted: a 30 s campaign can spend most of its time with the
    coordinator paused or restarting; the checker decides whether each miss is explained."""
    seed = result.spec.seed
    assert result.faults, f"no fault was injected (seed {seed})"
    verdict = result.verdict
    assert verdict.firings >= DURATION, f"window too short: {verdict.firings} firings"
    assert verdict.applied >= MIN_APPLIED, (
        f"only {verdict.applied} of {verdict.firings} firings applied (seed {seed}):"
        f" {verdict.misses[:10]}"
    )
    problems = result.violations()
    assert not problems, f"seed {seed} (replay: CHAOS_SEED={seed}): {problems[:20]}"
