"""Fleet consistency: replicas that disagree about a job are reported by ``status``,
``check`` and the log."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from singleton.backends.memory import MemoryBackend
from singleton.fleet import disagreements, fingerprint, publish, published, withdraw
from singleton.jobs import Job
from tests.firing_support import make_job
from tests.replicas import ROOT, fleet, wait_for
from tests.servers.redis import redis_server

pytestmark = pytest.mark.slow


def run(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "singleton", *args]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def other_config(tmp_path: Path, url: str, every: str) -> Path:
    path = tmp_path / "other.yaml"
    body = {"backend": {"url": url}, "jobs": {"report": {"every": every, "command": ["true"]}}}
    path.write_text(yaml.safe_dump(body))
    return path


def report() -> None:
    """The job's code; its name is part of the target's description."""


def two_jobs() -> tuple[Job, Job]:
    return make_job("report", report), make_job("report", report, mode="efficiency")


def test_a_fingerprint_changes_with_the_job() -> None:
    same, different = two_jobs()
    assert fingerprint(same) == fingerprint(make_job("report", report))
    assert fingerprint(same) != fingerprint(different)


def test_replicas_that_agree_show_no_disagreement() -> None:
    state = MemoryBackend()
    job, _ = two_jobs()
    publish(state, "r1", [job], ttl=60)
    publish(state, "r2", [job], ttl=60)
    assert disagreements(published(state)) == {}


def test_replicas_that_disagree_are_named_per_fingerprint() -> None:
    state = MemoryBackend()
    job, changed = two_jobs()
    publish(state, "r1", [job], ttl=60)
    publish(state, "r2", [changed], ttl=60)
    found = disagreements(published(state))
    assert found == {"report": {fingerprint(job): ["r1"], fingerprint(changed): ["r2"]}}


def test_a_stopped_replica_withdraws_from_the_fleet() -> None:
    state = MemoryBackend()
    job, changed = two_jobs()
    publish(state, "r1", [job], ttl=60)
    publish(state, "r2", [changed], ttl=60)
    withdraw(state, "r2")
    assert list(published(state)) == ["r1"]


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.server)])
def fleet_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    with redis_server(tmp_path / "redis", aof=True) as server:
        yield server.url


def test_two_replicas_with_different_schedules_are_reported(tmp_path: Path, fleet_url: str) -> None:
    url = fleet_url
    with fleet(tmp_path, url, {"report": {"every": "5s", "command": ["true"]}}) as group:
        group.start("r1")
        wait_for("r1 to publish", lambda: "r1" in published(group.ledger), timeout=20)
        second = other_config(tmp_path, url, "7s")
        with (tmp_path / "r2.log").open("wb") as log:
            r2 = subprocess.Popen(
                [sys.executable, "-m", "singleton", "--log-format", "json", "run", str(second)],
                env={
                    "PYTHONPATH": str(ROOT),
                    "PATH": "/usr/bin:/bin",
                    "SINGLETON_REPLICA_ID": "r2",
                },
                stderr=log,
            )
        try:
            wait_for(
                "r2 to log the disagreement",
                lambda: "fleet_disagreement" in (tmp_path / "r2.log").read_text(),
                timeout=20,
            )
            status = run("status", str(group.config), "--json")
            check = run("check", str(second))
        finally:
            r2.terminate()
            r2.wait(timeout=20)
    found = json.loads(status.stdout)["fleet"]["disagreements"]
    assert sorted(replica for replicas in found["report"].values() for replica in replicas) == [
        "r1",
        "r2",
    ]
    assert check.returncode == 0
    assert "replicas disagree about job 'report'" in check.stderr
