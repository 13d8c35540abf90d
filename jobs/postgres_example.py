"""Closing the books in PostgreSQL: the ``singleton`` mode with the PostgreSQL fencing guard.

The guard and the job's write share one transaction on the job's own connection, so they
commit together or not at all: a replica whose lease ran out while it was paused is refused
(``StaleToken``), and a night already closed is not closed again (``AlreadyApplied``), even
when a takeover reruns a firing whose owner stalled *after* writing.

The books live in ``BOOKS_DATABASE_URL``, which may be the database that holds singleton's
own schema. config.example.yaml does not import this module (it needs no PostgreSQL): list
``jobs.postgres_example`` in the ``jobs_modules`` of a config with a ``postgresql://``
backend to run it.
"""

from __future__ import annotations

import os
from datetime import timedelta

import psycopg

import singleton
from singleton.fencing.postgres import fence


def database_url() -> str:
    return os.environ.get("BOOKS_DATABASE_URL", "postgresql://localhost/app")


@singleton.job(cron="5 0 * * *", timezone="Europe/Berlin", lock_ttl="1m")
def close_books(ctx: singleton.JobContext) -> None:
    """Close the previous day's books, once per night, never under a stale token."""
    with psycopg.connect(database_url()) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS book_closings"
            " (run_id text PRIMARY KEY, closed_for date, token bigint, replica text)"
        )
        conn.commit()
        with conn.transaction():
            fence(conn, "book_closings", ctx.token, ctx.run_id)
            conn.execute(
                "INSERT INTO book_closings (run_id, closed_for, token, replica)"
                " VALUES (%s, %s, %s, %s)",
                (
                    ctx.run_id,
                    (ctx.scheduled_at - timedelta(days=1)).date(),
                    ctx.token,
                    ctx.replica_id,
                ),
            )
