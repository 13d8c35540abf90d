"""The fencing guard for a PostgreSQL database the job writes to, on the job's own psycopg 3
connection and inside its own transaction, so the fence and the write commit together::

    with psycopg.connect(DSN) as conn, conn.transaction():
        fence(conn, "orders", ctx.token, ctx.run_id)
        conn.execute("INSERT INTO orders ...")

The guard keeps two tables in the connection's current schema (its ``search_path``),
created on first use: ``singleton_fencing_tokens`` (the highest token accepted per resource)
and ``singleton_applied_runs`` (the runs applied per resource). Teams that create tables
through migrations can run :data:`TABLES` themselves.
"""

from __future__ import annotations

import weakref
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from singleton.errors import AlreadyApplied, StaleToken

#: The guard's tables, for migrations. Created under a transaction-level advisory lock:
#: concurrent CREATE TABLE IF NOT EXISTS of one table can fail on the catalog's unique index.
TABLES = """
SELECT pg_advisory_xact_lock(hashtextextended('singleton fencing tables', 0));
CREATE TABLE IF NOT EXISTS singleton_fencing_tokens (
    resource text PRIMARY KEY,
    token    bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS singleton_applied_runs (
    resource text NOT NULL,
    run_id   text NOT NULL,
    token    bigint NOT NULL,
    PRIMARY KEY (resource, run_id)
);
"""

_EXIST = """
SELECT to_regclass('singleton_fencing_tokens') IS NOT NULL
   AND to_regclass('singleton_applied_runs') IS NOT NULL
"""

# One statement checks and raises the token and records the run. The upsert locks the
# resource's row until the caller's transaction ends, so a concurrent writer waits for it and
# then compares against the token it committed: no stale writer can commit in between. An
# equal token passes, because one run may write several times.
_FENCE = """
WITH fenced AS (
    INSERT INTO singleton_fencing_tokens AS f (resource, token)
    VALUES (%(resource)s, %(token)s)
    ON CONFLICT (resource) DO UPDATE SET token = excluded.token
     WHERE f.token <= excluded.token
    RETURNING token
), applied AS (
    INSERT INTO singleton_applied_runs (resource, run_id, token)
    SELECT %(resource)s, %(run_id)s, token FROM fenced WHERE %(run_id)s::text IS NOT NULL
    ON CONFLICT (resource, run_id) DO NOTHING
    RETURNING token
)
SELECT EXISTS (SELECT FROM fenced), EXISTS (SELECT FROM applied)
"""

#: Connections on which the guard's tables are known to exist, so that only the first fence
#: on a connection pays for the check.
_ready: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


def fence(
    conn: psycopg.Connection[Any], resource: str, token: int, run_id: str | None = None
) -> None:
    """Refuse this write unless ``token`` is the highest ``resource`` has seen (and, given
    ``run_id``, unless that run was already applied), in the caller's transaction.

    On :class:`StaleToken` or :class:`AlreadyApplied` the transaction holds the guard's
    half-done work: roll it back (``with conn.transaction():`` does). On a connection in
    autocommit mode, call it inside ``conn.transaction()``, or the fence would commit on its
    own and guard nothing.
    """
    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        raise psycopg.ProgrammingError(
            "fence() needs the caller's transaction: call it inside conn.transaction()"
        )
    if conn not in _ready:
        _create_tables(conn)
    try:
        row = conn.execute(_FENCE, {"resource": resource, "token": token, "run_id": run_id})
    except psycopg.errors.UndefinedTable:
        # Tables created earlier on this connection were rolled back with their transaction.
        _ready.discard(conn)
        raise
    fenced, recorded = row.fetchone() or (False, False)
    if not fenced:
        raise StaleToken(
            f"resource {resource!r}: token {token} is lower than {_highest(conn, resource)},"
            " already accepted"
        )
    if run_id is not None and not recorded:
        raise AlreadyApplied(
            f"resource {resource!r}: run {run_id} was already applied under token"
            f" {applied(conn, resource, run_id)}"
        )


def applied(conn: psycopg.Connection[Any], resource: str, run_id: str) -> int | None:
    """The token under which ``run_id`` was applied to ``resource``, or None if it was not;
    for tests and inspection (the guard's tables must exist)."""
    row = conn.execute(
        "SELECT token FROM singleton_applied_runs WHERE resource = %s AND run_id = %s",
        (resource, run_id),
    ).fetchone()
    return None if row is None else int(row[0])


def _create_tables(conn: psycopg.Connection[Any]) -> None:
    exists = conn.execute(_EXIST).fetchone()
    if not (exists and exists[0]):
        conn.execute(TABLES)
    _ready.add(conn)


def _highest(conn: psycopg.Connection[Any], resource: str) -> int:
    row = conn.execute(
        "SELECT token FROM singleton_fencing_tokens WHERE resource = %s", (resource,)
    ).fetchone()
    return int(row[0]) if row else 0
