"""A fenced sink for multi-process tests: the job command writes its run through the SQLite
fencing guard, and every attempt, applied or refused, is logged with the time (``at``, the
writer's wall clock, which faketime may skew; ``mono``, the real CLOCK_MONOTONIC, which is
system-wide on Linux and so comparable with the chaos harness's own).

Usage (as a job command): python -m tests.helpers.sink SINK_DB [--sleep S] [--ignore-term]
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

from singleton.errors import AlreadyApplied, StaleToken
from singleton.fencing.sqlite import fence

LOG = """CREATE TABLE IF NOT EXISTS writes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, token INTEGER, replica TEXT,
    applied INTEGER, reason TEXT, at REAL, mono REAL)"""


def write(path: str, run_id: str, token: int, replica: str) -> None:
    conn = sqlite3.connect(path, timeout=30)
    try:
        with conn:
            conn.execute(LOG)
        try:
            with conn:
                fence(conn, "sink", token, run_id)
                conn.execute(
                    "INSERT INTO writes (run_id, token, replica, applied, at, mono)"
                    " VALUES (?, ?, ?, 1, ?, ?)",
                    (run_id, token, replica, time.time(), time.monotonic()),
                )
        except (StaleToken, AlreadyApplied) as exc:
            with conn:
                conn.execute(
                    "INSERT INTO writes (run_id, token, replica, applied, reason, at, mono)"
                    " VALUES (?, ?, ?, 0, ?, ?, ?)",
                    (run_id, token, replica, type(exc).__name__, time.time(), time.monotonic()),
                )
    finally:
        conn.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("sink")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--ignore-term", action="store_true")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    token = os.environ["SINGLETON_FENCING_TOKEN"]
    Path(f"{args.sink}.started-{token}").touch()
    # An event's timed wait, not time.sleep: under libfaketime the latter fails (EINVAL).
    threading.Event().wait(args.sleep)
    write(
        args.sink,
        os.environ["SINGLETON_RUN_ID"],
        int(token),
        os.environ["SINGLETON_REPLICA_ID"],
    )


if __name__ == "__main__":
    main()
