"""The PostgreSQL fencing guard on real connections: the fence and the job's write commit or
roll back together, concurrent writers are ordered by token, and a paused owner's late write
is refused while its successor's commits."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from singleton.backends.base import new_owner
from singleton.backends.postgres import PostgresBackend
from singleton.errors import AlreadyApplied, StaleToken
from singleton.fencing.postgres import applied, fence
from tests.replicas import wait_for
from tests.servers import wait_until
from tests.servers.postgres import PostgresServer, shared_server

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent

Conn = psycopg.Connection[Any]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with shared_server() as server:
        yield server


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    """A database of the test's own, so it starts without the guard's tables."""
    url = postgres.create_database()
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE items (seq serial PRIMARY KEY, value text)")
    return url


@pytest.fixture
def conn(url: str) -> Iterator[Conn]:
    connection = psycopg.connect(url)
    yield connection
    connection.close()


def write(conn: Conn, token: int, value: str, run_id: str | None = None) -> None:
    with conn.transaction():
        fence(conn, "items", token, run_id)
        conn.execute("INSERT INTO items (value) VALUES (%s)", (value,))


def values(conn: Conn) -> list[str]:
    with conn.transaction():
        return [row[0] for row in conn.execute("SELECT value FROM items ORDER BY seq")]


def test_higher_and_equal_tokens_are_accepted(conn: Conn) -> None:
    write(conn, 3, "a")
    write(conn, 3, "b")
    write(conn, 9, "c")
    assert values(conn) == ["a", "b", "c"]


def test_lower_token_is_refused_and_the_write_is_not_committed(conn: Conn) -> None:
    write(conn, 5, "current")
    with pytest.raises(StaleToken, match=r"'items': token 4 is lower than 5"):
        write(conn, 4, "stale")
    assert values(conn) == ["current"]


def test_second_application_of_a_run_is_refused_and_not_committed(conn: Conn) -> None:
    write(conn, 5, "first", run_id="j@2026-12-01T01:30:00Z")
    with pytest.raises(AlreadyApplied, match=r"run j@2026-12-01T01:30:00Z .* under token 5"):
        write(conn, 6, "again", run_id="j@2026-12-01T01:30:00Z")
    assert values(conn) == ["first"]
    with conn.transaction():
        assert applied(conn, "items", "j@2026-12-01T01:30:00Z") == 5


def test_guard_and_write_roll_back_together(conn: Conn) -> None:
    write(conn, 1, "before")
    fence(conn, "items", 8, "run-1")
    conn.execute("INSERT INTO items (value) VALUES ('undone')")
    conn.rollback()
    write(conn, 2, "after")
    assert values(conn) == ["before", "after"]
    with conn.transaction():
        assert applied(conn, "items", "run-1") is None


def test_a_fence_that_would_commit_on_its_own_is_refused(url: str) -> None:
    with (
        psycopg.connect(url, autocommit=True) as conn,
        pytest.raises(psycopg.ProgrammingError, match=r"inside conn\.transaction"),
    ):
        fence(conn, "items", 1)


def test_a_lower_token_waits_for_the_higher_one_to_commit_and_is_refused(
    postgres: PostgresServer, url: str, conn: Conn
) -> None:
    name = f"waiter-{uuid.uuid4().hex[:8]}"
    outcome: list[BaseException | None] = []
    write(conn, 1, "first")
    fence(conn, "items", 5)  # the transaction stays open, holding the resource's row

    def stale() -> None:
        with psycopg.connect(f"{url}?application_name={name}") as other:
            try:
                write(other, 4, "stale")
                outcome.append(None)
            except StaleToken as exc:
                outcome.append(exc)

    waiter = threading.Thread(target=stale)
    waiter.start()
    dbname = url.rsplit("/", 1)[1]
    wait_until(
        "the stale writer to wait on the row lock",
        lambda: (
            postgres.sql(
                "SELECT count(*) FROM pg_stat_activity"
                f" WHERE application_name = '{name}' AND wait_event_type = 'Lock'",
                dbname,
            )
            == [(1,)]
        ),
    )
    conn.execute("INSERT INTO items (value) VALUES ('current')")
    conn.commit()
    waiter.join(timeout=10)
    assert len(outcome) == 1 and isinstance(outcome[0], StaleToken)
    assert values(conn) == ["first", "current"]


def test_racing_writers_accept_tokens_in_non_decreasing_order(url: str) -> None:
    tokens = list(range(1, 201))
    random.shuffle(tokens)
    start = threading.Barrier(4, timeout=30)
    errors: list[BaseException] = []

    def race(mine: list[int]) -> None:
        try:
            with psycopg.connect(url) as own:
                start.wait()  # the first fences create the guard's tables, all at once
                for token in mine:
                    try:
                        write(own, token, str(token))
                    except StaleToken:
                        pass
        except BaseException as exc:
            errors.append(exc)

    racers = [threading.Thread(target=race, args=(tokens[i::4],)) for i in range(4)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    assert not errors, errors[0]
    with psycopg.connect(url) as conn:
        accepted = [int(v) for v in values(conn)]
    assert accepted == sorted(accepted)
    assert accepted[-1] == 200


HOLDER = """
import sys
import psycopg
from singleton.backends.base import new_owner
from singleton.backends.postgres import PostgresBackend
from singleton.clock import SYSTEM_CLOCK
from singleton.errors import AlreadyApplied, StaleToken
from singleton.fencing.postgres import fence
from singleton.lease import LeaseKeeper

url = sys.argv[1]
backend = PostgresBackend(url)
lease = backend.try_acquire("items", 1.0, new_owner("paused"))
LeaseKeeper(backend, lease, SYSTEM_CLOCK, on_lost=lambda reason: None).start()
print(lease.token, flush=True)
sys.stdin.readline()  # SIGSTOPped here until its lease is long gone
with psycopg.connect(url) as conn:
    try:
        with conn.transaction():
            fence(conn, "items", lease.token, "items@1")
            conn.execute("INSERT INTO items (value) VALUES ('late')")
        print("applied", flush=True)
    except (StaleToken, AlreadyApplied) as exc:
        print(type(exc).__name__, flush=True)
"""


def test_a_sigstopped_owner_s_late_write_is_refused_while_the_new_owner_commits(
    url: str, conn: Conn
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        paused_token = int(holder.stdout.readline())
        os.kill(holder.pid, signal.SIGSTOP)  # its lease keeper stops renewing
        successor = PostgresBackend(url)
        lease = wait_for(
            "the paused owner's lease to run out",
            lambda: successor.try_acquire("items", 30.0, new_owner("successor")),
            timeout=5,
        )
        successor.close()
        assert lease.token > paused_token
        write(conn, lease.token, "successor", run_id="items@1")
        os.kill(holder.pid, signal.SIGCONT)
        out, _ = holder.communicate("go\n", timeout=30)
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
            holder.wait()
    assert out.strip() == "StaleToken"
    assert values(conn) == ["successor"]


def test_the_example_job_closes_the_books_once_per_firing_under_rising_tokens(
    url: str, tmp_path: Path
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump({"backend": {"url": url}, "jobs_modules": ["jobs.postgres_example"]})
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("SINGLETON_")} | {
        "BOOKS_DATABASE_URL": url,
        "PYTHONPATH": str(ROOT),
    }
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "singleton", "trigger", str(config), "close_books"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "close_books succeeded"
    with psycopg.connect(url) as conn:
        tokens = [row[0] for row in conn.execute("SELECT token FROM book_closings ORDER BY token")]
        assert len(tokens) == 2 and tokens[0] < tokens[1]
        with pytest.raises(StaleToken), conn.transaction():
            fence(conn, "book_closings", tokens[0])
