"""A campaign's run directory as the checker's input, so the verdict is computed offline
from files alone and can be recomputed later (``python -m tests.chaos.rundir RUNDIR``):

``oracle-<job>.db`` (the fenced oracle's log), ``history.json`` (``singleton history --json
--limit 0``), ``nemesis.jsonl`` (the faults), ``window.json`` (the firings checked and the
clock pairing), ``leaks.json`` and ``notes.json`` (skips the replicas logged).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from dataclasses import asdict
from pathlib import Path

from tests.chaos.checker import Attempt, FaultSpan, Verdict, Window, Write, check


def read_oracle(path: Path) -> list[Write]:
    job = path.stem.removeprefix("oracle-")
    if not path.exists():
        return []
    conn = sqlite3.connect(path, timeout=30)
    try:
        rows = conn.execute(
            "SELECT seq, run_id, token, replica, applied, reason, mono FROM writes ORDER BY seq"
        ).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()
    return [Write(r[0], job, r[1], int(r[2]), r[3], bool(r[4]), r[5], float(r[6])) for r in rows]


def writes(rundir: Path) -> list[Write]:
    return [w for path in sorted(rundir.glob("oracle-*.db")) for w in read_oracle(path)]


def history(rundir: Path) -> list[Attempt]:
    return [
        Attempt(a["run_id"], a["state"], a["token"], a["replica"], a["reason"])
        for a in json.loads((rundir / "history.json").read_text())
    ]


def faults(rundir: Path) -> list[FaultSpan]:
    log = rundir / "nemesis.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return [
        FaultSpan(record["kind"], record["start"], record["end"])
        for record in map(json.loads, lines)
    ]


def save_window(rundir: Path, window: Window) -> None:
    (rundir / "window.json").write_text(json.dumps(asdict(window)))


def verdict(rundir: Path) -> Verdict:
    window = Window(**json.loads((rundir / "window.json").read_text()))
    leaks = json.loads((rundir / "leaks.json").read_text())
    notes = json.loads((rundir / "notes.json").read_text())
    return check(window, writes(rundir), history(rundir), faults(rundir), leaks, notes)


def main(argv: list[str]) -> int:
    result = verdict(Path(argv[0]))
    summary = {
        "firings": result.firings,
        "applied": result.applied,
        "misses": result.misses,
        "unexplained": result.unexplained,
        "stale_applied": [asdict(w) for w in result.stale_applied],
        "stale_refused": result.stale_refused,
        "fenced_duplicates": result.duplicates,
        "ledger_disagreements": result.ledger_disagreements,
        "leaks": result.leaks,
        "per_fault": {kind: asdict(row) for kind, row in result.per_fault.items()},
    }
    print(json.dumps(summary, indent=1))  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
