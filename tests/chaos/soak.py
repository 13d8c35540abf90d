"""The soak size of the chaos suite: ``make chaos-soak`` runs this.

Every backend in turn (one at a time: the machine has two cores), minutes of random faults
each, 4 replicas and 5 jobs (three firing every second, two every two seconds), so that each
backend sees 1,000+ firings; then the generated part of docs/reliability.md is rewritten with
the numbers and the seed.
Replay one backend's run: ``make chaos-soak SEED=N BACKENDS=redis``.

Exit status 1 if any backend broke an invariant it claims (the report is written anyway).
"""

from __future__ import annotations

import argparse
import logging
import random
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.chaos import report
from tests.chaos.coordinators import BACKENDS
from tests.chaos.harness import Result, Spec, load_result, run_campaign

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.soak")
    parser.add_argument("--minutes", type=float, default=4.5, help="of faults per backend")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--seed", type=int, default=0, help="0: a random one")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=5, help="odd ones every 1 s, even every 2 s")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    parser.add_argument("--faults", default="", help="only these fault kinds (comma-separated)")
    parser.add_argument("--gap", type=float, nargs=2, default=(5.0, 12.0), help="seconds")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument(
        "--recheck",
        type=Path,
        help="no campaign: recompute the verdicts of a kept soak directory and rewrite the report",
    )
    args = parser.parse_args(argv)
    if args.recheck:
        return recheck(args.recheck, args.out)
    # The harness's own ledger client reconnects noisily through coordinator restarts.
    logging.getLogger("kazoo").setLevel(logging.CRITICAL)
    seed = args.seed or random.SystemRandom().randrange(1, 2**31)
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}; known: {', '.join(BACKENDS)}")
    if not 3 <= args.replicas <= 10:
        parser.error("--replicas must be 3..10")
    started = datetime.now(UTC)
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="singleton-chaos-soak-"))
    results: list[Result] = []
    for backend in backends:
        spec = Spec(
            backend=backend,
            seed=seed,
            duration=args.minutes * 60,
            replicas=args.replicas,
            jobs=args.jobs,
            gap=(args.gap[0], args.gap[1]),
            faults=tuple(f for f in args.faults.split(",") if f),
        )
        say(f"{backend}: seed {seed}, {args.minutes:g} min of faults")
        result = run_campaign(spec, root / backend)
        results.append(result)
        v = result.verdict
        say(
            f"{backend}: {v.firings} firings, {len(result.faults)} faults,"
            f" {len(v.misses)} misses ({len(v.unexplained)} unexplained),"
            f" {len(v.duplicates)} fenced duplicates, {v.stale_refused} stale refused,"
            f" {len(v.stale_applied)} stale applied, violations: {result.violations()[:5]}"
        )
        given = " ".join(sys.argv[1:] if argv is None else argv)
        replay = f"make chaos-soak SEED={seed} MINUTES={args.minutes:g} BACKENDS=<one of them>"
        generated = report.render(
            results,
            f"make chaos-soak` (`python -m tests.chaos.soak {given}",
            replay,
            f"{started:%Y-%m-%d %H:%M} UTC",
            (time.monotonic() - began) / 60,
        )
        report.write(args.out, generated)
    failed = [r for r in results if r.violations()]
    if args.keep or failed:
        say(f"run directories kept in {root}")
    else:
        shutil.rmtree(root)
    return 1 if failed else 0


def recheck(root: Path, out: Path) -> int:
    """Recompute every verdict of a kept soak from its run directories alone (the checker is
    offline), keeping the report's line on how and when the campaigns ran."""
    results = [
        load_result(root / backend)
        for backend in BACKENDS
        if (root / backend / "verdict.json").exists()
    ]
    made = next((line for line in out.read_text().splitlines() if line.startswith("Made by ")), "")
    made = made.split(" Replay a backend", 1)[0]
    note = f"{made} Verdicts recomputed offline from its run directories by `python -m"
    note += f" tests.chaos.soak --recheck {root}`."
    report.write(out, report.render_results(results, note))
    for result in results:
        say(f"{result.spec.backend}: violations {result.violations()[:5]}")
    return 1 if any(r.violations() for r in results) else 0


def say(line: str) -> None:
    print(f"{datetime.now(UTC):%H:%M:%S} {line}", flush=True)  # noqa: T201


if __name__ == "__main__":
    sys.exit(main())
