"""Table 3: many replicas contending for one firing.

``contenders`` firers, each with its own backend connection (as separate replicas would
have), fire the same run ID at the same instant; the owner's job holds for a moment, the
rest stand by until the firing is done. Counted on the coordinator, not in the client:

* Redis: ``INFO commandstats``, script calls and direct commands (calls made inside our
  scripts are listed apart: they are the server's work, not round trips). No ``MONITOR``:
  it would slow the server it watches.
* PostgreSQL: ``pg_stat_statements`` calls in the benchmark's database.
* ZooKeeper: ``mntr`` packets received; etcd: gRPC messages received (``/metrics``). Both
  see session pings and lease keep-alives too, so an idle window of the same length, just
  before, is subtracted.

A wake-up is a standby's ``wait`` that returned before its timeout; per release, ZooKeeper,
etcd and PostgreSQL queue their standbys and should wake one, Redis publishes to all.
"""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.servers import BACKENDS, Coordinators
from bench.stats import Figure
from bench.targets import PROBE
from singleton.app import load
from singleton.backends.base import Backend
from singleton.clock import SYSTEM_CLOCK
from singleton.events import Event, Events
from singleton.firing import Firer
from singleton.jobs import Job
from tests.servers.zookeeper import four_letters

NOTE = """
50 replicas (one process, each with its own backend client and connection) fire the same
run ID at the same instant; the owner's job holds 0.3 s, the others stand by
(`mode: singleton`) until the firing is done, then each acquires once, sees `succeeded` in
the ledger and lets go. **commands/firing**: what the coordinator received for the whole
firing (by the counter in the last column), idle background subtracted;
**wake-ups/release**: standby waits that ended early, per lease released; **settle**: the
instant → the last replica done. **runs**: how many times the job ran (must be 1). SQLite
has no server to count on.
"""

HOLD = 0.3
#: Commands our Redis scripts call inside themselves (counted by commandstats as well).
SCRIPT_INNER = frozenset(
    "get set incr del hget hset hgetall hexists hdel zadd zrange zrem zrangebyscore "
    "zrangebylex zscore publish pexpire pttl time exists expire".split()
)


@dataclass
class Row:
    backend: str
    commands: list[float] = field(default_factory=list)
    inner: list[float] = field(default_factory=list)
    wakeups: list[float] = field(default_factory=list)
    settle: list[float] = field(default_factory=list)
    runs: list[int] = field(default_factory=list)
    counter: str = ""


class Counter:
    """Reads a coordinator's own count of what it received."""

    def __init__(self, servers: Coordinators, kind: str, database: str) -> None:
        self.servers = servers
        self.kind = kind
        self.database = database

    @property
    def label(self) -> str:
        return {
            "redis": "INFO commandstats",
            "redlock": "INFO commandstats, 3 nodes",
            "postgresql": "pg_stat_statements",
            "zookeeper": "mntr packets_received",
            "etcd": "grpc_server_msg_received_total",
        }.get(self.kind, "none")

    def read(self) -> tuple[float, float]:
        """(requests, inner script calls) so far."""
        if self.kind in ("redis", "redlock"):
            nodes = [self.servers.redis] if self.kind == "redis" else self.servers.redlock
            requests = inner = 0.0
            for node in nodes:
                for name, calls in node.commandstats().items():
                    if name in ("info", "config|resetstat"):
                        continue
                    if name in SCRIPT_INNER:
                        inner += calls
                    else:
                        requests += calls
            return requests, inner
        if self.kind == "postgresql":
            rows = self.servers.postgres.sql(
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements s"
                " JOIN pg_database d ON d.oid = s.dbid"
                f" WHERE d.datname = '{self.database}'"
            )
            return float(str(rows[0][0])), 0.0
        if self.kind == "zookeeper":
            found = re.search(r"zk_packets_received\s+(\d+)",
                              four_letters(self.servers.zookeeper.port, "mntr"))  # fmt: skip
            return float(found.group(1)) if found else 0.0, 0.0
        if self.kind == "etcd":
            url = self.servers.etcd.members[0].client_url + "/metrics"
            with urllib.request.urlopen(url, timeout=5) as page:
                text = page.read().decode()
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("grpc_server_msg_received_total")
            )
            return total, 0.0
        return 0.0, 0.0


@dataclass
class Watch:
    """What every contender's backend did: early wait returns and releases."""

    early: int = 0
    releases: int = 0
    started: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def instrument(self, backend: Backend) -> None:
        wait = backend.wait
        release = backend.release
        finish_and_release = backend.finish_and_release

        def timed_wait(name: str, timeout: float) -> None:
            t0 = time.monotonic()
            wait(name, timeout)
            if time.monotonic() - t0 < timeout * 0.95 - 0.005:
                with self.lock:
                    self.early += 1

        def counted(func: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                try:
                    return func(*args, **kwargs)
                finally:
                    with self.lock:
                        self.releases += 1

            return call

        backend.wait = timed_wait  # type: ignore[method-assign]
        backend.release = counted(release)  # type: ignore[method-assign]
        backend.finish_and_release = counted(finish_and_release)  # type: ignore[method-assign]

    def on_event(self, event: Event) -> None:
        if event.kind == "started":
            with self.lock:
                self.started += 1


CONFIG = """
backend:
  url: "{url}"
jobs:
  contended:
    every: 3600s
    call: bench.targets:probe
    lock_ttl: 10s
    misfire_grace: 60s
"""


def _fire_all(firers: list[Firer], job: Job, at: datetime) -> float:
    """Every firer fires ``job`` at ``at``; seconds from ``at`` until the last is done."""
    threads = [threading.Thread(target=f.fire, args=(job, at), daemon=True) for f in firers]
    time.sleep(max(0.0, at.timestamp() - time.time()))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return time.time() - at.timestamp()


def one_backend(servers: Coordinators, kind: str, firings: int, contenders: int) -> Row:
    folder = servers.workdir / f"contention-{kind}"
    folder.mkdir(exist_ok=True)
    url = servers.url(kind, "contention")
    config = folder / "singleton.yaml"
    config.write_text(CONFIG.format(url=url))
    app = load(config)
    job = app.jobs["contended"]
    counter = Counter(servers, kind, url.rsplit("/", 1)[1])
    row = Row(kind, counter=counter.label)
    PROBE.hold = HOLD
    stopping = threading.Event()
    with ExitStack() as stack:
        firers = []
        watch = Watch()
        for i in range(contenders):
            backend = app.open_backend()
            stack.callback(backend.close)
            watch.instrument(backend)
            events = Events(f"c{i}")
            events.add(watch.on_event)
            firers.append(Firer(backend, f"c{i}", SYSTEM_CLOCK, events, stopping))
        for _ in range(firings):
            watch.early = watch.releases = watch.started = 0
            t0, idle_from = time.monotonic(), counter.read()
            time.sleep(1.0)
            t1, idle_to = time.monotonic(), counter.read()
            rate = (idle_to[0] - idle_from[0]) / (t1 - t0)
            at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=1)
            before = counter.read()
            t2 = time.monotonic()
            settle = _fire_all(firers, job, at)
            after = counter.read()
            background = rate * (time.monotonic() - t2)
            row.commands.append(after[0] - before[0] - background)
            row.inner.append(after[1] - before[1])
            row.wakeups.append(watch.early / max(1, watch.releases))
            row.settle.append(settle)
            row.runs.append(watch.started)
        stopping.set()
    PROBE.hold = 0.0
    return row


def measure(servers: Coordinators, firings: int = 3, contenders: int = 50) -> list[Row]:
    return [one_backend(servers, kind, firings, contenders) for kind in BACKENDS]


def table(rows: list[Row]) -> list[list[str]]:
    out = [["backend", "commands/firing", "inside scripts", "wake-ups/release", "settle",
            "runs", "counted by"]]  # fmt: skip
    for row in rows:
        counted = row.backend != "sqlite"
        out.append(
            [
                row.backend,
                Figure.of(row.commands).show(unit="", scale=1, digits=0) if counted else "—",
                Figure.of(row.inner).show(unit="", scale=1, digits=0)
                if row.backend in ("redis", "redlock")
                else "—",
                Figure.of(row.wakeups).show(unit="", scale=1, digits=1),
                Figure.of(row.settle).show(unit="s", scale=1, digits=2),
                "/".join(str(r) for r in row.runs),
                row.counter,
            ]
        )
    return out
