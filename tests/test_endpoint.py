"""The sidecar endpoint of a real ``singleton run`` process: health, readiness, metrics and
status over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from singleton import pausing
from tests.replicas import Fleet, fleet, wait_for
from tests.servers import free_port
from tests.servers.redis import redis_server

pytestmark = pytest.mark.slow


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = get(port, "/metrics")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def succeeded(port: int) -> float:
    return samples(port).get(
        ("singleton_runs_total", (("job", "tick"), ("outcome", "succeeded"))), 0.0
    )


@pytest.fixture
def sidecar(tmp_path: Path) -> Iterator[tuple[Fleet, int]]:
    port = free_port()
    url = f"sqlite:///{tmp_path / 'state.db'}"
    jobs = {"tick": {"every": "1s", "command": ["true"]}}
    with fleet(tmp_path, url, jobs, server={"listen": f"127.0.0.1:{port}"}) as group:
        group.start("r1")
        wait_for("the endpoint", lambda: get(port, "/readyz")[0] == 200, timeout=20)
        yield group, port


def test_healthz_and_readyz_answer_ok(sidecar: tuple[Fleet, int]) -> None:
    _, port = sidecar
    assert get(port, "/healthz") == (200, "ok\n")
    assert get(port, "/readyz") == (200, "ok\n")


def test_metrics_parse_and_count_runs_as_they_happen(sidecar: tuple[Fleet, int]) -> None:
    _, port = sidecar
    first = wait_for("a counted run", lambda: succeeded(port), timeout=10)
    wait_for("more runs", lambda: succeeded(port) >= first + 2, timeout=10)
    names = {name for name, _ in samples(port)}
    assert "singleton_lock_acquire_seconds_bucket" in names
    assert "singleton_fencing_token" in names


def test_metric_labels_never_carry_a_run_id(sidecar: tuple[Fleet, int]) -> None:
    _, port = sidecar
    wait_for("a counted run", lambda: succeeded(port), timeout=10)
    _, text = get(port, "/metrics")
    assert "@" not in text


def test_status_shows_next_fire_times_and_the_last_attempt(sidecar: tuple[Fleet, int]) -> None:
    _, port = sidecar
    wait_for("a counted run", lambda: succeeded(port), timeout=10)
    status, text = get(port, "/status")
    body = json.loads(text)
    assert status == 200
    assert body["replica"] == "r1"
    assert body["backend"]["reachable"] is True
    [job] = body["jobs"]
    assert job["name"] == "tick" and job["next"].endswith("Z")
    assert job["last_attempt"]["job"] == "tick"


def test_an_unknown_path_is_404(sidecar: tuple[Fleet, int]) -> None:
    _, port = sidecar
    assert get(port, "/nope")[0] == 404


@pytest.mark.server
def test_a_stopped_coordinator_shows_in_status_but_not_in_readyz(tmp_path: Path) -> None:
    port = free_port()
    jobs = {"tick": {"every": "1s", "command": ["true"]}}
    settings = {"server": {"listen": f"127.0.0.1:{port}"}}
    with (
        redis_server(tmp_path / "redis", aof=True) as redis,
        fleet(tmp_path, redis.url, jobs, **settings) as group,
    ):
        group.start("r1")
        wait_for("the endpoint", lambda: get(port, "/readyz")[0] == 200, timeout=20)
        redis.stop()
        status, text = get(port, "/status")
        assert status == 200
        backend = json.loads(text)["backend"]
        assert backend["reachable"] is False and backend["error"]
        assert get(port, "/readyz") == (200, "ok\n")
        assert get(port, "/healthz") == (200, "ok\n")


def test_a_paused_job_shows_its_pause_in_status_and_metrics(sidecar: tuple[Fleet, int]) -> None:
    group, port = sidecar
    pausing.pause(group.ledger, pausing.Pause("tick", "alice@ops", datetime.now(UTC), "disk full"))

    def paused_metric() -> bool:
        return samples(port).get(("singleton_job_paused", (("job", "tick"),))) == 1.0

    wait_for("the pause in the metrics", paused_metric, timeout=10)
    _, body = get(port, "/status")
    [job] = json.loads(body)["jobs"]
    assert job["paused"]["by"] == "alice@ops" and job["paused"]["note"] == "disk full"
    pausing.resume(group.ledger, "tick")
    wait_for("the resume in the metrics", lambda: not paused_metric(), timeout=10)
