"""The coordinators a benchmark runs against, started from the test suite's own fixtures
(``tests/servers``), so the benchmark and the tests cannot drift apart in how a server is
run. Every server is a child process on a free loopback port in a temp dir, stopped by pid
when the ``with`` block ends, Ctrl-C and SIGTERM included (see :func:`interruptible`).

Redis runs without persistence: the benchmark measures the protocol, not the disk (with
``appendfsync always`` every write waits for an fsync, and so would every baseline's).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from tests.servers.etcd import EtcdCluster, etcd_cluster
from tests.servers.postgres import PostgresServer, fresh_server
from tests.servers.redis import RedisServer, redis_server, redis_servers, redlock_url
from tests.servers.zookeeper import ZookeeperServer, standalone

#: The backends measured, in the order of every table.
BACKENDS = ("sqlite", "redis", "redlock", "zookeeper", "etcd", "postgresql")


@dataclass
class Coordinators:
    """The running servers and how to reach them."""

    workdir: Path
    redis: RedisServer
    redlock: list[RedisServer]
    zookeeper: ZookeeperServer
    etcd: EtcdCluster
    postgres: PostgresServer
    databases: dict[str, str] = field(default_factory=dict)

    def url(self, backend: str, purpose: str = "bench") -> str:
        """A backend URL; ``purpose`` keeps sections apart (their own SQLite file, Redis
        prefix via the caller, PostgreSQL database, ZooKeeper/etcd prefix)."""
        if backend == "sqlite":
            return f"sqlite:///{self.workdir / f'{purpose}.db'}"
        if backend == "redis":
            return self.redis.url
        if backend == "redlock":
            return redlock_url(self.redlock)
        if backend == "zookeeper":
            return f"zookeeper://{self.zookeeper.address}/{purpose}"
        if backend == "etcd":
            return self.etcd.url(f"/{purpose}")
        if backend == "postgresql":
            if purpose not in self.databases:
                self.databases[purpose] = self.postgres.create_database()
            return self.databases[purpose]
        raise ValueError(backend)


def _with_statement_counts(server: PostgresServer) -> None:
    """Load ``pg_stat_statements`` (a restart), so contention can count statements as the
    server executed them rather than as a client thinks it sent them."""
    server.sql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    server.restart()
    server.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")


@contextmanager
def coordinators() -> Iterator[Coordinators]:
    """Every server, started once for the whole benchmark."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="singleton-bench-")))
        redis = stack.enter_context(redis_server(workdir / "redis", aof=False))
        nodes = stack.enter_context(redis_servers(workdir / "redlock", count=3, aof=False))
        zookeeper = stack.enter_context(standalone(workdir / "zookeeper"))
        etcd = stack.enter_context(etcd_cluster(workdir / "etcd", size=1))
        postgres = stack.enter_context(fresh_server())
        _with_statement_counts(postgres)
        yield Coordinators(workdir, redis, nodes, zookeeper, etcd, postgres)


class Children:
    """Processes a benchmark starts (replicas): each is killed by its pid at exit."""

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[bytes]] = []

    def add(self, process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self._started.append(process)
        return process

    def kill_all(self) -> None:
        for process in self._started:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
        self._started.clear()


CHILDREN = Children()


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every ``finally`` (server stops, child kills) runs."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        CHILDREN.kill_all()
        signal.signal(signal.SIGTERM, previous)


def process_stats(pid: int) -> tuple[float, int, int]:
    """CPU seconds (user + system), RSS and peak RSS in bytes of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = peak = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
    return cpu, rss, peak
