"""A shard owner: the ``ownership`` mode.

Why ``ownership``: a shard must have one writer at a time, and a writer that lost its lease
while paused must not write after its successor has. That takes a fencing token the store
checks on every write, so this mode is refused at start on a backend without fencing.
Each firing advances the shard's cursor; the guard (without a run ID: what matters here is
the order of writers, not once-per-firing) refuses any write under an older token.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import singleton
from singleton.fencing.sqlite import fence

#: Where the example keeps its shard; next to this file unless SHARD_DB says otherwise.
DATABASE = Path(os.environ.get("SHARD_DB", Path(__file__).resolve().parent / "shard.db"))


@singleton.job(every="5s", mode="ownership", lock_ttl="15s")
def own_shard(ctx: singleton.JobContext) -> None:
    """Advance shard 0's cursor by one batch, as its current owner."""
    conn = sqlite3.connect(DATABASE)
    try:
        with conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS shard_cursor"
                " (shard INTEGER PRIMARY KEY, position INTEGER, owner TEXT, token INTEGER)"
            )
        with conn:
            fence(conn, "shard-0", ctx.token)
            conn.execute(
                "INSERT INTO shard_cursor (shard, position, owner, token) VALUES (0, 1, ?, ?)"
                " ON CONFLICT (shard) DO UPDATE SET position = position + 1,"
                " owner = excluded.owner, token = excluded.token",
                (ctx.replica_id, ctx.token),
            )
    finally:
        conn.close()
