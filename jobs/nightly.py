"""A nightly compaction: the ``singleton`` mode, with a fenced, idempotent SQLite write.

Why ``singleton``: compaction must happen once per night, not at most once and not on
every replica. If the replica running it dies, another takes the firing over; if the lease
lies (a long GC pause, a stopped process), the fencing token makes the database refuse the
stale owner's write, and the run ID makes a second application of the same night a no-op.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import singleton
from singleton.fencing.sqlite import fence

#: Where the example keeps its data; next to this file unless COMPACT_DB says otherwise.
DATABASE = Path(os.environ.get("COMPACT_DB", Path(__file__).resolve().parent / "compaction.db"))


@singleton.job(cron="30 2 * * *", timezone="Europe/Berlin", lock_ttl="30s")
def compact(ctx: singleton.JobContext) -> None:
    """Record one compaction per night, refused for a stale token or a night already done."""
    conn = sqlite3.connect(DATABASE)
    try:
        with conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS compactions"
                " (run_id TEXT PRIMARY KEY, token INTEGER, replica TEXT)"
            )
        with conn:
            fence(conn, "compactions", ctx.token, ctx.run_id)
            conn.execute(
                "INSERT INTO compactions (run_id, token, replica) VALUES (?, ?, ?)",
                (ctx.run_id, ctx.token, ctx.replica_id),
            )
    finally:
        conn.close()
