"""Sentry against a local HTTP server that records the SDK's envelopes: one check-in pair per
firing whatever the replica count, and job errors tagged with their firing."""

from __future__ import annotations

import gzip
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from singleton.sentry import check_in_id
from tests.replicas import fleet, soon, wait_for

pytestmark = pytest.mark.slow


class Collector:
    """Sentry's ingest, as far as the SDK can tell: records every envelope item."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                collector.record(body)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.dsn = f"http://public@127.0.0.1:{self.server.server_address[1]}/1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, envelope: bytes) -> None:
        lines = envelope.split(b"\n")
        index = 1
        while index + 1 < len(lines):
            header = json.loads(lines[index])
            payload = json.loads(lines[index + 1])
            with self._lock:
                self.items.append((header.get("type", ""), payload))
            index += 2

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [payload for item, payload in self.items if item == kind]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sentry() -> Iterator[Collector]:
    collector = Collector()
    yield collector
    collector.close()


def test_three_replicas_send_one_check_in_pair_per_firing(
    tmp_path: Path, sentry: Collector
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    jobs = {"tick": {"every": "1s", "command": ["true"]}}
    with fleet(tmp_path, url, jobs, sentry={"dsn": sentry.dsn, "environment": "test"}) as group:
        group.start_many(3)
        wait_for(
            "four firings",
            lambda: len([a for a in group.history("tick") if a.state == "succeeded"]) >= 4,
            timeout=30,
        )
        succeeded = [a.run_id for a in group.history("tick") if a.state == "succeeded"]
    check_ins: dict[str, list[str]] = {}
    for payload in sentry.of("check_in"):
        assert payload["monitor_slug"] == "tick"
        check_ins.setdefault(payload["check_in_id"], []).append(payload["status"])
    for run_id in succeeded:
        assert check_ins.get(check_in_id(run_id)) == ["in_progress", "ok"], run_id
    assert sum(statuses.count("ok") for statuses in check_ins.values()) == len(succeeded)


def test_a_failing_job_sends_one_error_event_tagged_with_its_firing(
    tmp_path: Path, sentry: Collector
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    jobs = {"boom": {"every": "30s", "anchor": soon(), "call": "tests.helpers.failing:boom"}}
    settings = {"sentry": {"dsn": sentry.dsn, "crons": False}}
    with fleet(tmp_path, url, jobs, **settings) as group:
        group.start_many(3)
        failed = wait_for(
            "a failed attempt",
            lambda: [a for a in group.history("boom") if a.state == "failed"],
            timeout=40,
        )
    [attempt] = failed
    events = sentry.of("event")
    assert len(events) == 1
    tags = events[0]["tags"]
    assert tags["job"] == "boom"
    assert tags["run_id"] == attempt.run_id
    assert tags["token"] == str(attempt.token)
    assert tags["replica"] == attempt.replica
    assert events[0]["exception"]["values"][0]["type"] == "RuntimeError"
    assert sentry.of("check_in") == []
