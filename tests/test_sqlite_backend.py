"""What the SQLite backend promises beyond the shared contract: durable tokens, expiry that no
wall clock can move, and faults of a local file (a busy database, a folder it cannot use)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from singleton.backends.base import new_owner
from singleton.backends.sqlite import SqliteBackend
from singleton.errors import BackendUnavailable, ConfigError
from tests.replicas import FAKETIME

ACQUIRE_AND_PRINT = """
import sys
from singleton.backends.sqlite import SqliteBackend
from singleton.backends.base import new_owner
backend = SqliteBackend(sys.argv[1])
lease = backend.try_acquire("skewed", 60.0, new_owner("faketime"))
print(lease.token if lease else "busy")
"""


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def test_tokens_survive_reopening_the_file(url: str) -> None:
    first = SqliteBackend(url)
    lease = first.try_acquire("job", 5.0, new_owner("a"))
    assert lease is not None
    first.release(lease)
    first.close()
    again = SqliteBackend(url)
    try:
        second = again.try_acquire("job", 5.0, new_owner("b"))
        assert second is not None and second.token > lease.token
    finally:
        again.close()


def test_a_lease_from_another_boot_counts_as_expired(url: str) -> None:
    backend = SqliteBackend(url)
    try:
        lease = backend.try_acquire("job", 3600.0, new_owner("a"))
        assert lease is not None
        conn = sqlite3.connect(backend.path)
        with conn:
            conn.execute("UPDATE singleton_locks SET boot_id = 'an-earlier-boot'")
        conn.close()
        assert backend.holder("job") is None
        assert backend.try_acquire("job", 5.0, new_owner("b")) is not None
    finally:
        backend.close()


def test_a_replica_with_a_skewed_wall_clock_cannot_expire_a_live_lease(url: str) -> None:
    assert FAKETIME.exists(), "faketime is missing: run scripts/install-servers"
    backend = SqliteBackend(url)
    try:
        assert backend.try_acquire("skewed", 60.0, new_owner("honest")) is not None
        env = dict(
            os.environ,
            LD_PRELOAD=str(FAKETIME),
            FAKETIME="+2h",
            FAKETIME_DONT_FAKE_MONOTONIC="1",
            PYTHONPATH=str(Path(__file__).resolve().parent.parent),
        )
        out = subprocess.run(
            [sys.executable, "-c", ACQUIRE_AND_PRINT, url],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert out.stdout.strip() == "busy"
    finally:
        backend.close()


def test_a_database_locked_by_another_writer_is_unavailable_not_lost(url: str) -> None:
    backend = SqliteBackend(url, busy_timeout=0.2)
    blocker = sqlite3.connect(backend.path, isolation_level=None)
    try:
        lease = backend.try_acquire("job", 5.0, new_owner("a"))
        assert lease is not None
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(BackendUnavailable):
            backend.renew(lease)
        blocker.execute("ROLLBACK")
        assert backend.renew(lease).token == lease.token
    finally:
        blocker.close()
        backend.close()


def test_a_missing_folder_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        SqliteBackend(f"sqlite:///{tmp_path / 'nowhere' / 'state.db'}")


def test_a_url_with_a_host_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"want sqlite:///relative\.db"):
        SqliteBackend("sqlite://somehost/state.db")


OPEN_AT_ONCE = """
import sys, time
from singleton.backends.sqlite import SqliteBackend
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
SqliteBackend(sys.argv[1]).close()
"""


def test_replicas_opening_a_new_file_at_once_all_succeed(url: str) -> None:
    start = time.time() + 1.0
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_AT_ONCE, url, str(start)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    errors = [process.communicate(timeout=30)[1] for process in processes]
    assert [process.returncode for process in processes] == [0, 0, 0, 0], errors
