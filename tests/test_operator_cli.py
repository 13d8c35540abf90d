"""The operator's commands — ``status``, ``trigger``, ``unlock`` — as real processes against
real ``singleton run`` replicas on one SQLite file.

Jobs write through the fenced sink (``tests/helpers/sink.py``), which logs every write,
applied or refused; the tests follow the ledger, the sink and the lock row, not sleeps.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from singleton.backends.base import new_owner
from singleton.backends.sqlite import SqliteBackend
from singleton.clock import iso_z
from tests.replicas import ROOT, events, fleet, sink_command, wait_for

pytestmark = pytest.mark.slow

SINGLETON = Path(sys.executable).with_name("singleton")
#: Never due while a test runs: the replicas stay idle and only ``trigger`` runs the job.
NEVER = "2099-01-01T00:00:00Z"
MANUAL_RUN_ID = re.compile(
    r"work@manual-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
)
HISTORY_KEYS = {
    "run_id",
    "job",
    "attempt",
    "state",
    "reason",
    "token",
    "replica",
    "scheduled_at",
    "started_at",
    "finished_at",
    "error",
}
STATUS_COLUMNS = ["JOB", "MODE", "HOLDER", "TOKEN", "LEASE LEFT", "LAST RUN", "STATE"]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def sink(tmp_path: Path) -> Path:
    return tmp_path / "sink.db"


def soon() -> str:
    """An ``anchor`` two seconds from now, so an ``every: 30s`` job fires once, promptly."""
    return iso_z(datetime.now(UTC) + timedelta(seconds=2))


def write_config(folder: Path, url: str, jobs: dict[str, dict[str, object]]) -> Path:
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump({"backend": {"url": url}, "jobs": jobs}))
    return config


def cli(*args: str | Path, replica: str = "operator") -> subprocess.CompletedProcess[str]:
    """The installed ``singleton`` console script, as an operator would run it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINGLETON_")}
    env.update(SINGLETON_REPLICA_ID=replica, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [str(SINGLETON), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


def sink_writes(sink: Path) -> list[sqlite3.Row]:
    if not sink.exists():
        return []
    conn = sqlite3.connect(sink, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM writes ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def status_rows(stdout: str) -> dict[str, dict[str, str]]:
    """``singleton status``'s table, by job, each row by column header."""
    header, *lines = stdout.splitlines()
    starts = [header.index(column) for column in STATUS_COLUMNS]
    bounds = list(zip(starts, [*starts[1:], None], strict=True))
    rows = [
        {c: line[a:b].strip() for c, (a, b) in zip(STATUS_COLUMNS, bounds, strict=True)}
        for line in lines
    ]
    return {row["JOB"]: row for row in rows}


def test_status_shows_the_replica_running_the_job_as_holder_with_its_token(
    tmp_path: Path, sqlite_url: str, sink: Path
) -> None:
    job: dict[str, object] = {
        "every": "30s",
        "anchor": soon(),
        "command": sink_command(sink, 30),
        "lock_ttl": "3s",
    }
    with fleet(tmp_path, sqlite_url, {"work": job}, shutdown_grace="200ms") as group:
        group.start("r1")
        running = wait_for("a running attempt", lambda: group.running("work"), timeout=10)
        result = cli("status", group.config)
    assert result.returncode == 0, result.stderr
    row = status_rows(result.stdout)["work"]
    assert row["MODE"] == "singleton"
    assert row["HOLDER"] == "r1"
    assert row["TOKEN"] == str(running.token)
    assert re.fullmatch(r"\d+\.\ds", row["LEASE LEFT"])
    assert 0 < float(row["LEASE LEFT"][:-1]) <= 3.0
    assert row["LAST RUN"] == running.run_id
    assert row["STATE"] == "running"


def test_status_json_shows_each_lock_and_last_attempt_in_the_contract_shape(
    tmp_path: Path, sqlite_url: str, sink: Path
) -> None:
    jobs: dict[str, dict[str, object]] = {
        "work": {"every": "30s", "anchor": soon(), "command": sink_command(sink, 30)},
        "idle": {"at": NEVER, "command": ["true"]},
    }
    with fleet(tmp_path, sqlite_url, jobs, shutdown_grace="200ms") as group:
        group.start("r1")
        running = wait_for("a running attempt", lambda: group.running("work"), timeout=10)
        result = cli("status", group.config, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) == {"backend", "jobs", "fleet"}
    assert data["backend"] == sqlite_url
    assert data["fleet"] == {"replicas": ["r1"], "disagreements": {}}
    by_name = {job["name"]: job for job in data["jobs"]}
    assert set(by_name) == {"work", "idle"}
    for job in data["jobs"]:
        assert set(job) == {"name", "schedule", "mode", "lock", "paused", "last_attempt"}
        assert job["paused"] is None
        assert isinstance(job["schedule"], str) and job["mode"] == "singleton"

    lock = by_name["work"]["lock"]
    assert set(lock) == {"holder", "replica", "token", "lease_left"}
    assert lock["holder"].startswith("r1:") and lock["replica"] == "r1"
    assert lock["token"] == running.token
    assert isinstance(lock["lease_left"], float) and 0 < lock["lease_left"] <= 30.0

    last = by_name["work"]["last_attempt"]
    assert set(last) == HISTORY_KEYS
    assert last["run_id"] == running.run_id and last["job"] == "work"
    assert last["attempt"] == 1 and last["state"] == "running"
    assert last["token"] == running.token and last["replica"] == "r1"
    assert last["finished_at"] is None and last["error"] is None

    assert by_name["idle"]["lock"] is None
    assert by_name["idle"]["last_attempt"] is None


def test_trigger_runs_the_job_once_now_with_a_manual_run_id(
    tmp_path: Path, sqlite_url: str, sink: Path
) -> None:
    job: dict[str, object] = {"at": NEVER, "command": sink_command(sink)}
    with fleet(tmp_path, sqlite_url, {"work": job}) as group:
        group.start("r1")  # up and idle: the job is not due
        asked = datetime.now(UTC)
        result = cli("trigger", group.config, "work")
        answered = datetime.now(UTC)
        history = group.history("work")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "work succeeded"
    [attempt] = history
    assert MANUAL_RUN_ID.fullmatch(attempt.run_id), attempt.run_id
    assert attempt.state == "succeeded" and attempt.attempt == 1
    assert attempt.replica == "operator" and attempt.token is not None
    assert asked - timedelta(seconds=1) <= attempt.scheduled_at <= answered
    [write] = sink_writes(sink)
    assert (write["run_id"], write["token"], write["applied"]) == (
        attempt.run_id,
        attempt.token,
        1,
    )


def test_trigger_exits_1_when_the_job_fails(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(tmp_path, sqlite_url, {"work": {"at": NEVER, "command": ["false"]}})
    result = cli("trigger", config, "work")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("singleton: work failed")
    ledger = SqliteBackend(sqlite_url)
    try:
        [attempt] = ledger.history("work", 0)
    finally:
        ledger.close()
    assert MANUAL_RUN_ID.fullmatch(attempt.run_id)
    assert attempt.state == "failed" and attempt.error


def test_trigger_of_an_unknown_job_exits_78_with_one_line(tmp_path: Path, sqlite_url: str) -> None:
    config = write_config(tmp_path, sqlite_url, {"work": {"at": NEVER, "command": ["true"]}})
    result = cli("trigger", config, "nope")
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "singleton: configuration error: unknown job 'nope'; known: work"
    ]


def test_unlock_without_force_exits_2_and_leaves_the_lock_held(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = write_config(tmp_path, sqlite_url, {"work": {"at": NEVER, "command": ["true"]}})
    backend = SqliteBackend(sqlite_url)
    try:
        lease = backend.try_acquire("work", 30.0, new_owner("someone"))
        assert lease is not None
        result = cli("unlock", config, "work")
        held = backend.holder("work")
        backend.release(lease)
    finally:
        backend.close()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "--force" in result.stderr
    assert held is not None and held.token == lease.token


def test_after_unlock_force_the_old_owners_late_write_is_refused(
    tmp_path: Path, sqlite_url: str, sink: Path
) -> None:
    # The old owner's job hangs (SIGSTOP) before its write; it ignores the SIGTERM its
    # replica sends on losing the lease, and kill_grace outlasts the hang.
    command = sink_command(sink, sleep=1.0, ignore_term=True)
    job: dict[str, object] = {
        "every": "30s",
        "anchor": soon(),
        "command": command,
        "lock_ttl": "3s",
    }
    settings = {"kill_grace": "20s", "shutdown_grace": "200ms"}
    with fleet(tmp_path, sqlite_url, {"work": job}, **settings) as group:
        replica = group.start("r1")
        old = wait_for("a running attempt", lambda: group.running("work"), timeout=10)
        assert old.token is not None
        wait_for("the job to start", Path(f"{sink}.started-{old.token}").exists, timeout=5)
        hung = {os.getpgid(pid) for pid in replica.children()}
        assert hung, "the job's process is gone"
        for pgid in hung:
            os.killpg(pgid, signal.SIGSTOP)

        above = old.token + 100
        unlocked = cli("unlock", group.config, "work", "--force", "--token-above", str(above))
        assert unlocked.returncode == 0, unlocked.stderr
        assert re.fullmatch(
            rf"unlocked work: evicted r1:[0-9a-f]+ \(token {old.token}\);"
            rf" the next token will be above {above}\n",
            unlocked.stdout,
        )

        triggered = cli("trigger", group.config, "work")
        assert triggered.returncode == 0, triggered.stderr
        [newer] = sink_writes(sink)
        assert newer["applied"] == 1 and newer["token"] > above

        # The trigger was the first owner of the job in its process: it closed the attempt
        # left running under a lower token.
        assert group.ledger.attempts(old.run_id)[-1].state == "abandoned"

        for pgid in hung:
            os.killpg(pgid, signal.SIGCONT)
        late = wait_for("the old owner's write", lambda: sink_writes(sink)[1:], timeout=5)
        assert [(w["token"], w["applied"], w["reason"]) for w in late] == [
            (old.token, 0, "StaleToken")
        ]
        wait_for("the old owner's finish", lambda: events(replica.log, "finish_refused"), 10)
        assert group.ledger.attempts(old.run_id)[-1].state == "abandoned"
