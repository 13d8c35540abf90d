"""The SQLite fencing guard, on real database files and real competing processes."""

from __future__ import annotations

import os
import random
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from singleton.errors import AlreadyApplied, StaleToken
from singleton.fencing.sqlite import applied, fence

ROOT = Path(__file__).resolve().parent.parent

RACER = """
import sqlite3, sys
from singleton.errors import StaleToken
from singleton.fencing.sqlite import fence

conn = sqlite3.connect(sys.argv[1], timeout=30)
print("ready", flush=True)
sys.stdin.readline()
for token in map(int, sys.argv[2].split(",")):
    try:
        with conn:
            fence(conn, "r", token)
            conn.execute("INSERT INTO log (token) VALUES (?)", (token,))
    except StaleToken:
        pass
conn.close()
"""


def connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=0)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "resource.db"
    conn = connect(path)
    with conn:
        conn.execute("CREATE TABLE items (value TEXT)")
        conn.execute("CREATE TABLE log (seq INTEGER PRIMARY KEY AUTOINCREMENT, token INTEGER)")
    conn.close()
    return path


@pytest.fixture
def conn(db: Path) -> Iterator[sqlite3.Connection]:
    connection = connect(db)
    yield connection
    connection.close()


def write(conn: sqlite3.Connection, token: int, value: str, run_id: str | None = None) -> None:
    with conn:
        fence(conn, "items", token, run_id)
        conn.execute("INSERT INTO items (value) VALUES (?)", (value,))


def values(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT value FROM items ORDER BY rowid")]


def test_higher_and_equal_tokens_are_accepted(conn: sqlite3.Connection) -> None:
    write(conn, 3, "a")
    write(conn, 3, "b")
    write(conn, 9, "c")
    assert values(conn) == ["a", "b", "c"]


def test_lower_token_is_refused_and_the_write_is_not_committed(conn: sqlite3.Connection) -> None:
    write(conn, 5, "current")
    with pytest.raises(StaleToken, match=r"'items': token 4 is lower than 5"):
        write(conn, 4, "stale")
    assert values(conn) == ["current"]


def test_second_application_of_a_run_is_refused_and_not_committed(
    conn: sqlite3.Connection,
) -> None:
    write(conn, 5, "first", run_id="j@2026-12-01T01:30:00Z")
    with pytest.raises(AlreadyApplied, match=r"run j@2026-12-01T01:30:00Z .* under token 5"):
        write(conn, 6, "again", run_id="j@2026-12-01T01:30:00Z")
    assert values(conn) == ["first"]
    assert applied(conn, "items", "j@2026-12-01T01:30:00Z") == 5


def test_guard_and_write_roll_back_together(conn: sqlite3.Connection) -> None:
    fence(conn, "items", 8, "run-1")
    conn.execute("INSERT INTO items (value) VALUES ('undone')")
    conn.rollback()
    write(conn, 2, "after")
    assert values(conn) == ["after"]
    assert applied(conn, "items", "run-1") is None


def test_guard_holds_the_write_lock_until_commit(db: Path, conn: sqlite3.Connection) -> None:
    fence(conn, "items", 1)
    other = connect(db)
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        conn.commit()
        other.execute("BEGIN IMMEDIATE")
        other.rollback()
    finally:
        other.close()


def test_racing_processes_accept_tokens_in_non_decreasing_order(db: Path) -> None:
    tokens = list(range(1, 301))
    random.shuffle(tokens)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(db), ",".join(map(str, half))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for half in (tokens[::2], tokens[1::2])
    ]
    for racer in racers:
        assert racer.stdout is not None
        assert racer.stdout.readline() == "ready\n"
    for racer in racers:
        assert racer.stdin is not None
        racer.stdin.write("go\n")
        racer.stdin.flush()
    for racer in racers:
        racer.communicate(timeout=60)
        assert racer.returncode == 0
    conn = connect(db)
    try:
        accepted = [row[0] for row in conn.execute("SELECT token FROM log ORDER BY seq")]
    finally:
        conn.close()
    assert accepted == sorted(accepted)
    assert accepted[-1] == 300
