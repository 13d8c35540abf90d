"""The ``http`` target against a small real HTTP server started by the test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import closing
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from singleton.context import JobContext
from singleton.http_target import HttpTarget


class App:
    """The application container: answers each path as the test says, records requests."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                app.requests.append(
                    {
                        "path": self.path,
                        "headers": dict(self.headers),
                        "body": self.rfile.read(length),
                    }
                )
                status = {"/ok": 200, "/boom": 500, "/slow": 200}[self.path]
                if self.path == "/slow":
                    app.release.wait(10)
                body = b"fine" if status == 200 else b"x" * 2000
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def app() -> Iterator[App]:
    server = App()
    yield server
    server.close()


def context() -> JobContext:
    return JobContext(
        job="sync",
        run_id="sync@2026-12-01T01:30:00Z",
        attempt=2,
        scheduled_at=datetime(2026, 12, 1, 1, 30, tzinfo=UTC),
        token=42,
        replica_id="r1",
    )


def test_a_2xx_answer_is_success(app: App) -> None:
    with closing(HttpTarget(f"{app.url}/ok", body='{"x": 1}')) as http:
        result = http.run(context())
    assert result.ok and result.output == "fine"
    assert app.requests[0]["body"] == b'{"x": 1}'


def test_the_request_carries_the_firing_in_x_singleton_headers(app: App) -> None:
    with closing(HttpTarget(f"{app.url}/ok", headers={"Authorization": "Bearer t"})) as http:
        http.run(context())
    headers = app.requests[0]["headers"]
    assert headers["X-Singleton-Job"] == "sync"
    assert headers["X-Singleton-Run-Id"] == "sync@2026-12-01T01:30:00Z"
    assert headers["X-Singleton-Attempt"] == "2"
    assert headers["X-Singleton-Fencing-Token"] == "42"
    assert headers["X-Singleton-Scheduled-At"] == "2026-12-01T01:30:00Z"
    assert headers["X-Singleton-Replica-Id"] == "r1"
    assert headers["Authorization"] == "Bearer t"


def test_a_500_is_a_failure_with_the_status_and_a_bounded_excerpt(app: App) -> None:
    with closing(HttpTarget(f"{app.url}/boom")) as http:
        result = http.run(context())
    assert not result.ok and result.error is not None
    assert result.error.startswith("HTTP 500: xxx")
    assert len(result.error) < 600


def test_a_request_past_its_timeout_is_a_failure(app: App) -> None:
    with closing(HttpTarget(f"{app.url}/slow", timeout=0.3)) as http:
        result = http.run(context())
    assert not result.ok and result.error is not None and "timed out after 0.3s" in result.error


def test_a_refused_connection_is_a_failure() -> None:
    with closing(HttpTarget("http://127.0.0.1:9/ok", timeout=2.0)) as http:
        result = http.run(context())
    assert not result.ok and result.error is not None and "ConnectError" in result.error


def test_a_lease_lost_mid_request_abandons_it_at_once(app: App) -> None:
    ctx = context()
    threading.Timer(0.2, ctx.cancel.set, ("lost_lease",)).start()
    started = time.monotonic()
    with closing(HttpTarget(f"{app.url}/slow", timeout=10.0)) as http:
        result = http.run(ctx)
    assert time.monotonic() - started < 1.0
    assert not result.ok and result.error == "request abandoned: lost_lease"
