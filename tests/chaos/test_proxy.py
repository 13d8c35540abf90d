"""The harness's TCP proxy does the faults it claims, against a real echo server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.chaos.proxy import Proxy

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def echo() -> Iterator[str]:
    """A real TCP echo server on a free loopback port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # the proxy resets its upstream too
            while data := conn.recv(4096):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    server.close()


@pytest.fixture
def proxy(echo: str) -> Iterator[Proxy]:
    proxy = Proxy(echo)
    yield proxy
    proxy.close()


def connect(proxy: Proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


def round_trip(client: socket.socket, data: bytes) -> None:
    """Send ``data`` and get it back through the proxy and the echo server."""
    client.sendall(data)
    assert client.recv(len(data)) == data


def linked(proxy: Proxy) -> socket.socket:
    """A connection the proxy has accepted and forwarded (one round trip made)."""
    client = connect(proxy)
    round_trip(client, b"ping")
    return client


def test_pass_forwards_both_ways(proxy: Proxy) -> None:
    with connect(proxy) as client:
        round_trip(client, b"ping")


def test_reset_ends_open_connections_with_an_rst(proxy: Proxy) -> None:
    with linked(proxy) as client:
        proxy.set_mode("reset")
        with pytest.raises(ConnectionResetError):
            while client.recv(4096):
                pass


def test_reset_refuses_new_connections_until_pass(proxy: Proxy) -> None:
    proxy.set_mode("reset")
    with pytest.raises(ConnectionResetError), connect(proxy) as client:
        while client.recv(4096):  # (on loopback the RST may even beat connect's return)
            pass
    proxy.set_mode("pass")
    with connect(proxy) as client:
        round_trip(client, b"back")


def test_blackhole_keeps_the_connection_open_and_drops_the_bytes(proxy: Proxy) -> None:
    with linked(proxy) as client:
        proxy.set_mode("blackhole")
        client.sendall(b"lost")
        client.settimeout(1.0)
        with pytest.raises(TimeoutError):
            client.recv(4)


def test_leaving_blackhole_resets_the_connections_it_held(proxy: Proxy) -> None:
    with linked(proxy) as client:
        proxy.set_mode("blackhole")
        client.sendall(b"lost")
        proxy.set_mode("pass")
        with pytest.raises(ConnectionResetError):
            while client.recv(4096):
                pass


def test_slow_delays_each_chunk_each_way(proxy: Proxy) -> None:
    with linked(proxy) as client:
        proxy.set_mode("slow", delay=0.3)
        started = time.monotonic()
        round_trip(client, b"ping")
        assert time.monotonic() - started >= 0.6, "a round trip costs the delay twice"
        proxy.set_mode("pass")
        started = time.monotonic()
        round_trip(client, b"pong")
        assert time.monotonic() - started < 0.3, "and nothing once it is over"
