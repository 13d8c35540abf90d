"""Real ``redis-server`` processes for tests: a free port, a temp dir, stopped by pid.

``RedisServer`` can restart on the same dir and port (with AOF the data comes back; without,
it does not), be paused with SIGSTOP, and answer admin commands through its own client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis

from tests.servers import binary, free_port, stop, wait_until

#: Every key with a TTL, shortened by ARGV[1] ms (deleted if that is all it had left).
JUMP_CLOCK = """
local shortened = 0
for _, key in ipairs(redis.call('KEYS', '*')) do
  local left = redis.call('PTTL', key)
  if left > 0 then
    shortened = shortened + 1
    if left <= tonumber(ARGV[1]) then
      redis.call('DEL', key)
    else
      redis.call('PEXPIRE', key, left - tonumber(ARGV[1]))
    end
  end
end
return shortened
"""


class RedisServer:
    """One ``redis-server``: ``aof=True`` runs it with ``appendonly yes appendfsync always``
    (the setup for ``fencing``), ``aof=False`` with no persistence at all."""

    def __init__(
        self,
        workdir: Path,
        aof: bool = True,
        unix_socket: bool = False,
        extra: Sequence[str] = (),
        tls: bool = False,
    ) -> None:
        self.dir = workdir
        self.extra = list(extra)
        self.tls = tls
        self.dir.mkdir(parents=True, exist_ok=True)
        self.aof = aof
        self.port = free_port()
        self.socket = self.dir / "redis.sock" if unix_socket else None
        self.process: subprocess.Popen[bytes] | None = None
        self._admin: redis.Redis | None = None

    @property
    def url(self) -> str:
        if self.tls:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.dir / 'cert.pem'}"
        return f"redis://127.0.0.1:{self.port}/0"

    def _make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1, which clients trust by ``ssl_ca_certs``."""
        if (self.dir / "cert.pem").exists():
            return
        subprocess.run(
            [
                binary("openssl", "/usr/bin/openssl"),
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-keyout", str(self.dir / "key.pem"), "-out", str(self.dir / "cert.pem"),
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip

    @property
    def unix_url(self) -> str:
        assert self.socket is not None, "started without a unix socket"
        return f"unix://{self.socket}?db=0"

    def command_line(self) -> list[str]:
        line = [
            binary("redis-server", "/usr/bin/redis-server"),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "always" if self.aof else "everysec",
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.socket is not None:
            line += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        if self.tls:
            self._make_certificate()
            line[line.index("--port") + 1] = "0"
            line += [
                "--tls-port", str(self.port),
                "--tls-cert-file", str(self.dir / "cert.pem"),
                "--tls-key-file", str(self.dir / "key.pem"),
                "--tls-ca-cert-file", str(self.dir / "cert.pem"),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        return line + self.extra

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            self.command_line(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_until(f"redis-server on port {self.port}", self._answers, timeout=30)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.dir / "redis.log").read_text() if (self.dir / "redis.log").exists() else ""
            raise AssertionError(f"redis-server exited {self.process.returncode}: {log[-2000:]}")
        try:
            return bool(self.admin.ping())
        except redis.RedisError:
            return False

    @property
    def admin(self) -> redis.Redis:
        """A plain client for the test's own commands (not the backend under test)."""
        if self._admin is None:
            self._admin = redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)
        return self._admin

    def call(self, *args: Any) -> Any:
        return self.admin.execute_command(*args)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop by pid. SIGTERM lets Redis finish its AOF; SIGKILL does not."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self.process is not None:
            stop(self.process, sig)
            self.process = None

    def restart(self, sig: int = signal.SIGKILL) -> RedisServer:
        """Kill and start again on the same dir and port."""
        self.stop(sig)
        return self.start()

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def jump_clock(self, seconds: float) -> int:
        """What a jump of this server's clock ``seconds`` forward does to its keys: each key
        with a TTL expires that much sooner (at once if its TTL was shorter). Returns how
        many keys it shortened.

        Emulated, because libfaketime (TESTING.md's T3 tool) cannot run redis-server here:
        Debian links it with jemalloc, which calls ``clock_gettime`` while libfaketime is
        still initialising, and the server never starts (wolfcw/libfaketime#130). Expiry is
        the only thing a jump changes for a lock; one script does it, atomically."""
        return int(self.call("EVAL", JUMP_CLOCK, 0, round(seconds * 1000)))

    @contextmanager
    def monitor(self) -> Iterator[list[str]]:
        """The commands clients send meanwhile, in order, as lower-case names: one per round
        trip, unlike ``INFO commandstats``, which also counts the calls made inside scripts.
        """
        watcher = redis.Redis.from_url(self.url, decode_responses=True)
        marker = f"end-of-monitor-{os.getpid()}-{id(watcher)}"
        seen: list[str] = []
        done = threading.Event()
        with watcher.monitor() as feed:

            def read() -> None:
                while True:
                    found = feed.next_command()
                    if marker in found["command"]:
                        done.set()
                        return
                    if found["client_type"] != "lua":
                        seen.append(found["command"].split(" ", 1)[0].lower())

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            yield seen
            self.admin.echo(marker)
            assert done.wait(10), "MONITOR did not see the end marker"
        watcher.close()

    def commandstats(self) -> dict[str, int]:
        """Calls per command so far (``INFO commandstats``), e.g. ``{"evalsha": 3}``; calls
        made inside scripts count too."""
        stats = self.admin.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


@contextmanager
def redis_server(
    workdir: Path,
    aof: bool = True,
    unix_socket: bool = False,
    extra: Sequence[str] = (),
    tls: bool = False,
) -> Iterator[RedisServer]:
    server = RedisServer(workdir, aof=aof, unix_socket=unix_socket, extra=extra, tls=tls).start()
    try:
        yield server
    finally:
        server.stop()


def commands_between(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The calls per command between two :meth:`RedisServer.commandstats` readings."""
    return {
        name: after[name] - before.get(name, 0)
        for name in after
        if after[name] != before.get(name, 0)
    }


@contextmanager
def redis_servers(workdir: Path, count: int = 3, aof: bool = False) -> Iterator[list[RedisServer]]:
    """``count`` independent ``redis-server`` processes (Redlock's masters), each in its own
    dir under ``workdir``; every one started is stopped at exit, even if a later one failed."""
    servers: list[RedisServer] = []
    try:
        for i in range(count):
            server = RedisServer(workdir / f"node{i}", aof=aof)
            servers.append(server)
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


def redlock_url(servers: Sequence[RedisServer], auth: str = "") -> str:
    """``redlock://[auth@]127.0.0.1:P1,127.0.0.1:P2,…/0`` for ``servers``."""
    nodes = ",".join(f"127.0.0.1:{server.port}" for server in servers)
    return f"redlock://{auth + '@' if auth else ''}{nodes}/0"
