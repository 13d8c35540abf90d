"""The coordinator of one campaign, per backend: its real servers, the URL a replica uses
(through its own proxies), and the server-side faults the nemesis may inject.

Reuses the server fixtures of :mod:`tests.servers`; nothing here is a mock. ``fencing``
says whether the backend claims it (DESIGN's capability table): the checker holds those to
zero stale writes applied and zero unexplained misses, and reports the others' predicted
violations instead.
"""

from __future__ import annotations

import random
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.servers.etcd import EtcdCluster, etcd_cluster
from tests.servers.postgres import fresh_server
from tests.servers.redis import RedisServer, redis_servers

if TYPE_CHECKING:
    from tests.servers.zookeeper import ZookeeperEnsemble

#: Backends a campaign can run on, in the report's order.
BACKENDS = ("sqlite", "redis", "redis-volatile", "redlock", "zookeeper", "etcd", "postgres")


@dataclass
class Coordinator:
    """What the harness needs from a backend's servers.

    ``nodes`` are the upstream ``host:port`` the proxies front (empty for SQLite, a file);
    ``url_for(hosts)`` builds the backend URL over any list of hosts in that order.
    """

    backend: str
    fencing: bool
    nodes: list[str]
    url_for: Callable[[list[str]], str]
    restart: Callable[[random.Random], str] | None = None
    restart_member: Callable[[random.Random], str] | None = None
    #: SIGSTOP a server process (for a cluster: one member); returns how to resume it and
    #: what was paused.
    pause: Callable[[random.Random], tuple[Callable[[], None], str]] | None = None
    #: Jump a server's clock this many seconds forward (one Redlock node); what jumped.
    jump: Callable[[random.Random, float], str] | None = None
    heal: Callable[[], None] = lambda: None
    backend_options: dict[str, str] = field(default_factory=dict)
    #: Why this backend may break an invariant under the campaign's faults (None: it may not).
    predicted: str | None = None
    server_pids: Callable[[], list[int]] = list
    #: Directories the servers made outside the campaign's own dir, for the leak check.
    temp_dirs: list[Path] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The direct URL (no proxy): the harness's own reads, ``singleton history``."""
        return self.url_for(self.nodes)


def _pauser(
    pause: Callable[[], None], resume: Callable[[], None], what: str
) -> Callable[[random.Random], tuple[Callable[[], None], str]]:
    """A single server's pause fault."""

    def paused(_rng: random.Random) -> tuple[Callable[[], None], str]:
        pause()
        return resume, what

    return paused


def _sqlite(workdir: Path) -> Iterator[Coordinator]:
    path = workdir / "state.db"
    yield Coordinator("sqlite", True, [], lambda _hosts: f"sqlite:///{path}")


def _redis(workdir: Path, aof: bool) -> Iterator[Coordinator]:
    server = RedisServer(workdir / "redis", aof=aof).start()
    pids: list[int] = []

    def restart(_rng: random.Random) -> str:
        assert server.process is not None
        server.restart(signal.SIGKILL)
        assert server.process is not None
        pids.append(server.process.pid)
        return "redis-server kill -9, restart on the same dir"

    def heal() -> None:
        if server.process is None:
            server.start()
        else:
            server.resume()

    assert server.process is not None
    pids.append(server.process.pid)
    try:
        yield Coordinator(
            "redis" if aof else "redis-volatile",
            aof,
            [f"127.0.0.1:{server.port}"],
            lambda hosts: f"redis://{hosts[0]}/0",
            restart=restart,
            pause=_pauser(server.pause, server.resume, "redis-server SIGSTOP"),
            jump=lambda _rng, seconds: _jump(server, seconds, "redis-server"),
            heal=heal,
            predicted=None
            if aof
            else "no persistence: a restart loses the lock, the ledger and the token counter",
            server_pids=lambda: pids,
        )
    finally:
        server.stop()


def _jump(server: RedisServer, seconds: float, what: str) -> str:
    if server.process is None:
        return f"{what} down: no clock to jump"
    shortened = server.jump_clock(seconds)
    return f"{what} clock +{seconds:.1f}s ({shortened} keys expire early)"


def _redlock(workdir: Path) -> Iterator[Coordinator]:
    with redis_servers(workdir / "redlock", count=3, aof=False) as servers:
        pids = [s.process.pid for s in servers if s.process is not None]

        def restart_member(rng: random.Random) -> str:
            node = rng.randrange(len(servers))
            process = servers[node].restart(signal.SIGKILL).process
            assert process is not None
            pids.append(process.pid)
            return f"node{node} kill -9, restart without persistence"

        def heal() -> None:
            for server in servers:
                if server.process is None:
                    server.start()
                else:
                    server.resume()

        def pause(rng: random.Random) -> tuple[Callable[[], None], str]:
            node = rng.randrange(len(servers))
            servers[node].pause()
            return servers[node].resume, f"node{node} SIGSTOP"

        def jump(rng: random.Random, seconds: float) -> str:
            node = rng.randrange(len(servers))
            return _jump(servers[node], seconds, f"node{node}")

        yield Coordinator(
            "redlock",
            False,
            [f"127.0.0.1:{s.port}" for s in servers],
            lambda hosts: f"redlock://{','.join(hosts)}/0",
            restart_member=restart_member,
            pause=pause,
            jump=jump,
            heal=heal,
            predicted="no fencing token (per-node counters disagree across majorities); a node"
            " restarted without persistence forgets its vote, and one whose clock jumps expires"
            " it early, so two owners can hold a majority",
            server_pids=lambda: pids,
        )


def _zookeeper(workdir: Path) -> Iterator[Coordinator]:
    # Imported here, not at the top: other test modules load tests.servers.zookeeper as a
    # pytest plugin, and pytest cannot rewrite a plugin module imported before collection.
    from tests.servers.zookeeper import ensemble

    prefix = f"/chaos-{uuid.uuid4().hex[:8]}"
    with ensemble(workdir / "zookeeper") as group:
        pids = [m.pid for m in group.members]

        def restart_member(rng: random.Random) -> str:
            member = rng.choice(group.members)
            role = member.mode()
            member.kill()
            member.start().wait_serving()
            pids.append(member.pid)
            group.wait_quorum()
            return f"member {member.myid} ({role}) kill -9, restart"

        def restart(_rng: random.Random) -> str:
            for member in group.members:
                member.kill()
            for member in group.members:
                member.start()
            pids.extend(m.pid for m in group.members)
            group.wait_quorum()
            return "every member kill -9, restart on the same data dirs"

        def heal() -> None:
            _heal_ensemble(group)

        def pause(rng: random.Random) -> tuple[Callable[[], None], str]:
            member = rng.choice(group.members)
            role = member.mode()
            member.pause()
            return member.resume, f"member {member.myid} ({role}) SIGSTOP"

        yield Coordinator(
            "zookeeper",
            True,
            [m.address for m in group.members],
            lambda hosts: f"zookeeper://{','.join(hosts)}{prefix}",
            restart=restart,
            restart_member=restart_member,
            pause=pause,
            heal=heal,
            backend_options={"session_timeout": "3s"},
            server_pids=lambda: pids,
        )


def _heal_ensemble(group: ZookeeperEnsemble) -> None:
    for member in group.members:
        if member.process is None:
            member.start()
        else:
            member.resume()
    group.wait_quorum()


def _etcd(workdir: Path) -> Iterator[Coordinator]:
    prefix = f"/chaos-{uuid.uuid4().hex[:8]}"
    with etcd_cluster(workdir / "etcd", size=3) as cluster:
        pids = [m.process.pid for m in cluster.members if m.process is not None]

        def restart_member(rng: random.Random) -> str:
            member = rng.choice(cluster.members)
            leader = member is cluster.leader()
            member.kill()
            member.start()
            assert member.process is not None
            pids.append(member.process.pid)
            cluster.wait_healthy()
            return f"{member.name} ({'leader' if leader else 'follower'}) kill -9, restart"

        def restart(_rng: random.Random) -> str:
            for member in cluster.members:
                member.kill()
            for member in cluster.members:
                member.start()
                assert member.process is not None
                pids.append(member.process.pid)
            cluster.wait_healthy()
            return "every member kill -9, restart on the same data dirs"

        def pause(rng: random.Random) -> tuple[Callable[[], None], str]:
            member = rng.choice(cluster.members)
            leader = member is cluster.leader()
            member.pause()
            return member.resume, f"{member.name} ({'leader' if leader else 'follower'}) SIGSTOP"

        yield Coordinator(
            "etcd",
            True,
            [m.address for m in cluster.members],
            lambda hosts: f"etcd://{','.join(hosts)}{prefix}",
            restart=restart,
            restart_member=restart_member,
            pause=pause,
            heal=lambda: _heal_etcd(cluster),
            server_pids=lambda: pids,
        )


def _heal_etcd(cluster: EtcdCluster) -> None:
    for member in cluster.members:
        if member.running:
            member.resume()
        else:
            member.start()
    cluster.wait_healthy()


def _postgres(workdir: Path) -> Iterator[Coordinator]:
    del workdir  # the server keeps its own private dir (postgres must own it)
    with fresh_server() as server:
        dbname = server.create_database().rsplit("/", 1)[1]
        pids = [] if server.process is None else [server.process.pid]

        def restart(_rng: random.Random) -> str:
            server.restart()
            assert server.process is not None
            pids.append(server.process.pid)
            return "postgres fast shutdown, restart"

        yield Coordinator(
            "postgres",
            True,
            [f"127.0.0.1:{server.port}"],
            lambda hosts: f"postgresql://postgres@{hosts[0]}/{dbname}",
            restart=restart,
            pause=_pauser(server.pause, server.resume, "every postgres process SIGSTOP"),
            heal=server.heal,
            server_pids=lambda: pids,
            temp_dirs=[server.root],
        )


@contextmanager
def coordinator(backend: str, workdir: Path) -> Iterator[Coordinator]:
    """Start ``backend``'s servers under ``workdir``; stop them all at exit."""
    makers: dict[str, Callable[[Path], Iterator[Coordinator]]] = {
        "sqlite": _sqlite,
        "redis": lambda d: _redis(d, aof=True),
        "redis-volatile": lambda d: _redis(d, aof=False),
        "redlock": _redlock,
        "zookeeper": _zookeeper,
        "etcd": _etcd,
        "postgres": _postgres,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        yield stack.enter_context(contextmanager(makers[backend])(workdir))
