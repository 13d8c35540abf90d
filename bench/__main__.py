"""``python -m bench [--quick] [--only SECTION …] [--out docs/benchmarks.md]``.

Starts every server once, runs the sections in order, prints each table as it is done and
writes them all, with the machine they ran on, to the report file. ``--quick`` shrinks
every section (for checking the harness, not for quoting).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import contention, failover, firing, footprint, lock_cycle, scale
from bench.report import Table, machine, markdown
from bench.servers import Coordinators, coordinators, interruptible

FINDINGS = Path(__file__).with_name("findings.md")

Section = Callable[[Coordinators, bool], tuple[str, str, Table]]


def _lock_cycle(servers: Coordinators, quick: bool) -> tuple[str, str, Table]:
    rows = lock_cycle.measure(servers, rounds=2 if quick else 5, count=100 if quick else 400)
    return "1. Lock cycle", lock_cycle.NOTE, lock_cycle.table(rows)


def _firing(servers: Coordinators, quick: bool) -> tuple[str, str, Table]:
    rows = firing.measure(servers, rounds=1 if quick else 3, firings=3 if quick else 6)
    return "2. Firing overhead", firing.NOTE, firing.table(rows)


def _contention(servers: Coordinators, quick: bool) -> tuple[str, str, Table]:
    rows = contention.measure(servers, firings=1 if quick else 3, contenders=10 if quick else 50)
    return "3. Contention", contention.NOTE, contention.table(rows)


def _failover(servers: Coordinators, quick: bool) -> tuple[str, str, Table]:
    rows = failover.measure(servers, runs=1 if quick else 3)
    return "4. Failover", failover.NOTE, failover.table(rows)


def _scale(servers: Coordinators, quick: bool) -> tuple[str, str, Table]:
    result = scale.measure(servers, quick=quick)
    return "5. Scale", scale.NOTE, scale.table(result)


def _footprint(servers: Coordinators, quick: bool) -> tuple[str, str, Table]:
    result = footprint.measure(servers, runs=2 if quick else 5)
    return "6. Footprint", footprint.NOTE, footprint.table(result)


SECTIONS: dict[str, Section] = {
    "lock": _lock_cycle,
    "firing": _firing,
    "contention": _contention,
    "failover": _failover,
    "scale": _scale,
    "footprint": _footprint,
}

HEADER = """# Benchmarks

Produced by `make bench` (`python -m bench`), which starts its own Redis, three more Redis
nodes for Redlock, ZooKeeper, etcd and PostgreSQL on random loopback ports, measures, and
writes this file. Every figure is the **median over several runs, with the spread
(min..max of the runs) in brackets**; ratios are taken against baselines measured in the
same run, because the machine is shared and noisy.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small runs: check the harness")
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="these sections")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    chosen = args.only or list(SECTIONS)
    began = time.monotonic()
    parts = [HEADER, "## Machine\n", markdown(machine()), ""]
    print(parts[-2], flush=True)
    with interruptible(), coordinators() as servers:
        for name in chosen:
            started = time.monotonic()
            title, note, rows = SECTIONS[name](servers, args.quick)
            took = time.monotonic() - started
            text = f"## {title}\n\n{note.strip()}\n\n{markdown(rows)}\n\n_{took:.0f} s._\n"
            print("\n" + text, flush=True)
            parts.append(text)
    total = time.monotonic() - began
    parts.append(f"The whole run took {total / 60:.1f} minutes.\n")
    print(parts[-1])
    if args.only is None:
        # The profile and what was changed because of it are written by hand (they quote
        # runs of `python -m bench.profile`), and travel with every full report.
        parts.append(FINDINGS.read_text())
    if not args.no_write:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(parts))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
