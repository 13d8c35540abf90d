"""The sidecar's HTTP endpoint: ``/healthz``, ``/readyz``, ``/metrics``, ``/status``.

``/readyz`` says whether this sidecar is configured and scheduling — deliberately *not*
whether the coordinator answers: a coordinator blip must not take every application pod
out of its Service at once. ``/status`` is where coordinator reachability shows.

The standard library's threading HTTP server is enough for four read-only paths polled by
probes and Prometheus; it needs no dependency and no event loop.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from singleton.errors import ConfigError

log = logging.getLogger("singleton.server")

#: A route: returns (status, content type, body).
Route = Callable[[], tuple[int, str, bytes]]


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port``, ``:port`` (loopback) or ``[::1]:port`` → (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"server.listen {listen!r}: want host:port, e.g. 127.0.0.1:9100")
    return host.strip("[]") or "127.0.0.1", int(port)


def json_route(build: Callable[[], tuple[int, dict[str, Any]]]) -> Route:
    def route() -> tuple[int, str, bytes]:
        status, body = build()
        return status, "application/json", json.dumps(body, indent=2).encode()

    return route


class Endpoint:
    """A small HTTP server in a daemon thread, serving the given routes."""

    def __init__(self, listen: str, routes: dict[str, Route]) -> None:
        host, port = parse_listen(listen)
        handler = _handler(routes)
        try:
            self._server = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise ConfigError(f"server.listen {listen!r}: {exc.strerror}") from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="endpoint", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> Endpoint:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(routes: dict[str, Route]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                status, kind, body = 404, "text/plain", b"not found\n"
            else:
                try:
                    status, kind, body = route()
                except Exception:
                    log.exception("endpoint route failed", extra={"fields": {"path": self.path}})
                    status, kind, body = 500, "text/plain", b"internal error\n"
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Probes every few seconds are not worth a log line each."""

    return Handler
