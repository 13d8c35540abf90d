"""A TCP proxy owned by the harness, between one replica and one coordinator node.

There is no netem or toxiproxy on this machine, so connection faults come from here. Each
replica gets its own listener per coordinator node, so a fault can cut one replica off while
the others carry on. Threads, not asyncio: the nemesis switches modes from its own thread and
a few dozen sockets need no event loop.

Modes: ``pass`` forwards; ``blackhole`` keeps every socket open and drops what arrives (a
partition the kernel does not report); ``reset`` ends every connection with an RST and
refuses new ones the same way; ``slow`` forwards each chunk ``delay`` seconds late, each
way (a congested or distant link: a round trip costs twice the delay). Leaving
``blackhole`` resets the connections it held, since bytes were lost from their streams.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

Mode = Literal["pass", "blackhole", "reset", "slow"]
#: How long a pump blocks before it looks at its link's flags again.
POLL = 0.2


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0, so the peer gets an RST rather than a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@dataclass(eq=False)
class _Link:
    """One client connection and (unless black-holed from the start) its upstream."""

    client: socket.socket
    upstream: socket.socket | None
    blackholed: bool = False
    done: bool = False
    rst: bool = False
    _exited: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def pumps(self) -> int:
        return 1 if self.upstream is None else 2

    def end(self, rst: bool) -> None:
        self.rst = self.rst or rst
        self.done = True

    def pump_exited(self) -> bool:
        """The last pump out closes both sockets (never close a socket another thread may
        still be reading); True for that last one."""
        self.done = True
        with self._lock:
            self._exited += 1
            last = self._exited == self.pumps
        if last:
            for sock in (self.client, self.upstream):
                if sock is not None:
                    if self.rst:
                        _reset(sock)
                    else:
                        sock.close()
        return last


class Proxy:
    """One listener on 127.0.0.1 forwarding to ``upstream`` (``host:port``)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.mode: Mode = "pass"
        self.delay = 0.0
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(POLL)
        self.port = int(self._listener.getsockname()[1])
        self._threads: list[threading.Thread] = []
        self._spawn(self._accept)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]

    def set_mode(self, mode: Mode, delay: float = 0.0) -> None:
        with self._lock:
            self.mode = mode
            self.delay = delay
            for link in self._links:
                if mode == "reset" or (mode == "pass" and link.blackholed):
                    link.end(rst=True)
                elif mode == "blackhole":
                    link.blackholed = True

    def connections(self) -> int:
        with self._lock:
            return sum(1 for link in self._links if not link.done)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._open(client)

    def _open(self, client: socket.socket) -> None:
        mode = self.mode
        if mode == "reset":
            _reset(client)
            return
        upstream = None
        if mode in ("pass", "slow"):
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                _reset(client)  # the node is down: the client sees what it would see
                return
            upstream.settimeout(POLL)
        client.settimeout(POLL)
        link = _Link(client, upstream, blackholed=mode == "blackhole")
        with self._lock:
            self._links.add(link)
        self._spawn(self._pump, link, client, upstream)
        if upstream is not None:
            self._spawn(self._pump, link, upstream, client)

    def _pump(self, link: _Link, source: socket.socket, sink: socket.socket | None) -> None:
        try:
            while not link.done and not self._closed.is_set():
                try:
                    data = source.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                if link.blackholed or sink is None:
                    continue
                if self.mode == "slow" and self._closed.wait(self.delay):
                    break
                if not self._send(link, sink, data):
                    break
        finally:
            if link.pump_exited():
                with self._lock:
                    self._links.discard(link)

    def _send(self, link: _Link, sink: socket.socket, data: bytes) -> bool:
        """Send it all, even to a peer that is SIGSTOPped for a while (its buffer fills)."""
        view = memoryview(data)
        while view and not link.done:
            try:
                sent = sink.send(view)
            except TimeoutError:
                continue
            except OSError:
                return False
            view = view[sent:]
        return not view

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            for link in self._links:
                link.end(rst=False)
        self._listener.close()
        for thread in self._threads:
            thread.join(timeout=5)


@dataclass
class ProxySet:
    """One replica's proxies, one per coordinator node, switched together."""

    proxies: list[Proxy]

    @property
    def addresses(self) -> list[str]:
        return [proxy.address for proxy in self.proxies]

    def set_mode(self, mode: Mode, delay: float = 0.0) -> None:
        for proxy in self.proxies:
            proxy.set_mode(mode, delay)

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.close()


@contextmanager
def proxies(upstreams: list[str]) -> Iterator[ProxySet]:
    group = ProxySet([])
    try:
        for upstream in upstreams:
            group.proxies.append(Proxy(upstream))
        yield group
    finally:
        group.close()
