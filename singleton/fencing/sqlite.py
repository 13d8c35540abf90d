"""The fencing guard for a SQLite database the job writes to.

Usage, with the job's write in the same transaction::

    with conn:  # commits both, or rolls both back
        fence(conn, "orders", ctx.token, ctx.run_id)
        conn.execute("INSERT INTO orders ...")
"""

from __future__ import annotations

import sqlite3

from singleton.errors import AlreadyApplied, StaleToken

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS singleton_fencing_tokens"
    " (resource TEXT PRIMARY KEY, token INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS singleton_applied_runs"
    " (resource TEXT, run_id TEXT, token INTEGER, PRIMARY KEY (resource, run_id))",
)

# One statement checks and raises the token, so no other writer can slip in between; an
# equal token passes because one run may write several times.
_ADVANCE = """
INSERT INTO singleton_fencing_tokens (resource, token) VALUES (?, ?)
ON CONFLICT (resource) DO UPDATE SET token = excluded.token WHERE excluded.token >= token
RETURNING token
"""

_RECORD_RUN = """
INSERT INTO singleton_applied_runs (resource, run_id, token) VALUES (?, ?, ?)
ON CONFLICT (resource, run_id) DO NOTHING
RETURNING token
"""


def fence(conn: sqlite3.Connection, resource: str, token: int, run_id: str | None = None) -> None:
    """Refuse this write unless ``token`` is the highest ``resource`` has seen (and, given
    ``run_id``, unless that run was never applied), in the caller's transaction.

    Starts the transaction with ``BEGIN IMMEDIATE`` if none is open, so the write lock is
    held from the check to the caller's commit: no stale writer can commit in between. On
    :class:`StaleToken` or :class:`AlreadyApplied` the transaction is left open for the
    caller to roll back (``with conn:`` does).
    """
    if not conn.in_transaction:
        conn.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA:
        conn.execute(statement)
    if conn.execute(_ADVANCE, (resource, token)).fetchone() is None:
        highest = _highest(conn, resource)
        raise StaleToken(
            f"resource {resource!r}: token {token} is lower than {highest}, already accepted"
        )
    if run_id is None:
        return
    if conn.execute(_RECORD_RUN, (resource, run_id, token)).fetchone() is None:
        raise AlreadyApplied(
            f"resource {resource!r}: run {run_id} was already applied under token"
            f" {applied(conn, resource, run_id)}"
        )


def applied(conn: sqlite3.Connection, resource: str, run_id: str) -> int | None:
    """The token under which ``run_id`` was applied to ``resource``, or None if it was not;
    for tests and inspection (the guard's tables must exist)."""
    row = conn.execute(
        "SELECT token FROM singleton_applied_runs WHERE resource = ? AND run_id = ?",
        (resource, run_id),
    ).fetchone()
    return None if row is None else int(row[0])


def _highest(conn: sqlite3.Connection, resource: str) -> int:
    row = conn.execute(
        "SELECT token FROM singleton_fencing_tokens WHERE resource = ?", (resource,)
    ).fetchone()
    return int(row[0])
