"""The example config and jobs that the README points a new user at: each job runs, and the
fenced examples refuse what they should."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from singleton.errors import StaleToken
from singleton.fencing.sqlite import fence

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def example_env(tmp_path: Path) -> dict[str, str]:
    """The example's data files and ledger in a temp dir instead of the source tree."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("SINGLETON_")}
    return env | {
        "SINGLETON_BACKEND__URL": f"sqlite:///{tmp_path / 'state.db'}",
        "COMPACT_DB": str(tmp_path / "compaction.db"),
        "CACHE_FILE": str(tmp_path / "cache.json"),
        "SHARD_DB": str(tmp_path / "shard.db"),
        "PYTHONPATH": str(ROOT),
    }


def trigger(job: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "singleton", "trigger", str(ROOT / "config.example.yaml"), job]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("job", ["heartbeat", "compact", "refresh_cache", "own_shard"])
def test_each_example_job_runs(job: str, example_env: dict[str, str]) -> None:
    result = trigger(job, example_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{job} succeeded"


def test_the_example_jobs_cover_every_mode(example_env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "singleton", "jobs", str(ROOT / "config.example.yaml")]
    listing = subprocess.run(
        [*command, "--json"], env=example_env, capture_output=True, text=True, check=True
    )
    modes = {job["name"]: job["mode"] for job in json.loads(listing.stdout)}
    assert modes["compact"] == "singleton"
    assert modes["refresh_cache"] == "efficiency"
    assert modes["own_shard"] == "ownership"


def test_the_compaction_refuses_a_token_older_than_the_one_it_applied(
    example_env: dict[str, str], tmp_path: Path
) -> None:
    assert trigger("compact", example_env).returncode == 0
    conn = sqlite3.connect(tmp_path / "compaction.db")
    try:
        (token,) = conn.execute("SELECT token FROM compactions").fetchone()
        with pytest.raises(StaleToken), conn:
            fence(conn, "compactions", token - 1, "compact@2026-01-01T00:00:00Z")
    finally:
        conn.close()
