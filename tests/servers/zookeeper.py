"""Real ZooKeeper for tests: a standalone server and a three-member ensemble, each member a
``QuorumPeerMain`` child process on free loopback ports in a temp dir.

Test modules load the fixtures with ``pytest_plugins = ["tests.servers.zookeeper"]``, so the
session-scoped servers are started once for the whole run, whichever modules use them (and
import this module only under ``TYPE_CHECKING``: pytest must import a plugin first).
Destructive tests (pause, kill, restart) take ``fresh_zookeeper`` or ``fresh_ensemble``: a
server of their own, so a fault cannot leak into the next test.

Why these settings: ``tickTime=500`` lets a session time out in 1 s (the minimum is two
ticks) so expiry tests take seconds; the JVM runs with the serial collector and the C1
compiler only, which cuts its start from about 1.2 s to 0.3 s here; ``forceSync=no`` skips
fsync on the transaction log, which only a power loss would notice (a killed process leaves
the page cache intact), and ``preAllocSize`` keeps each log file small.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import binary, free_port, stop, wait_until

CLASSPATH = "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar"
JVM_OPTIONS = ["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xshare:auto"]
SETTINGS = {
    "tickTime": "500",
    "initLimit": "10",
    "syncLimit": "5",
    "clientPortAddress": "127.0.0.1",
    "admin.enableServer": "false",
    "4lw.commands.whitelist": "*",
    "minSessionTimeout": "1000",
    "maxSessionTimeout": "60000",
    "forceSync": "no",
    "preAllocSize": "1024",
}


def four_letters(port: int, command: str, timeout: float = 1.0) -> str:
    """A four-letter-word command's answer ('' when the server does not answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(command.encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except OSError:
        return ""
    return b"".join(chunks).decode(errors="replace")


def backend_url(hosts: str, userinfo: str = "") -> str:
    """A backend URL under a prefix of its own, so tests sharing a server never meet."""
    auth = f"{userinfo}@" if userinfo else ""
    return f"zookeeper://{auth}{hosts}/t-{uuid.uuid4().hex[:12]}"


@dataclass
class ZookeeperServer:
    """One server process: standalone, or a member of an ensemble (``myid`` > 0)."""

    workdir: Path
    port: int = field(default_factory=free_port)
    myid: int = 0
    peers: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        if self.myid:
            (data / "myid").write_text(f"{self.myid}\n")
        lines = [f"{key}={value}" for key, value in SETTINGS.items()]
        lines += [f"dataDir={data}", f"clientPort={self.port}", *self.peers]
        (self.workdir / "zoo.cfg").write_text("\n".join(lines) + "\n")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, userinfo: str = "") -> str:
        return backend_url(self.address, userinfo)

    @property
    def pid(self) -> int:
        assert self.process is not None, "the server is not running"
        return self.process.pid

    def start(self) -> ZookeeperServer:
        java = binary("java", "/usr/bin/java")
        binary("zookeeper.jar", "/usr/share/java/zookeeper.jar")
        command = [java, *JVM_OPTIONS, "-cp", CLASSPATH]
        command += ["org.apache.zookeeper.server.quorum.QuorumPeerMain"]
        command += [str(self.workdir / "zoo.cfg")]
        with (self.workdir / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
            )
        return self

    def ask(self, command: str) -> str:
        """A four-letter-word command's answer (``srvr``, ``wchp`` …)."""
        return four_letters(self.port, command)

    def mode(self) -> str | None:
        """``standalone``, ``leader`` or ``follower`` once it serves clients, else None."""
        for line in self.ask("srvr").splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return None

    def wait_serving(self, timeout: float = 30.0) -> None:
        # ``ruok`` answers before sessions are accepted; ``srvr`` shows a mode only after.
        wait_until(f"zookeeper on {self.address}", lambda: self.mode() is not None, timeout)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        """Stop and start again on the same data dir and port."""
        self.stop()
        self.start().wait_serving()

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


@dataclass
class ZookeeperEnsemble:
    """Three (or more) members on one host, one quorum."""

    members: list[ZookeeperServer]

    @property
    def hosts(self) -> str:
        return ",".join(member.address for member in self.members)

    def url(self) -> str:
        return backend_url(self.hosts)

    def running(self) -> list[ZookeeperServer]:
        return [member for member in self.members if member.process is not None]

    def leader(self) -> ZookeeperServer:
        wait_until("an ensemble leader", lambda: self._find("leader") is not None, 30.0)
        found = self._find("leader")
        assert found is not None
        return found

    def wait_quorum(self, timeout: float = 30.0) -> None:
        """Until every running member serves clients (it has a leader it follows)."""
        wait_until(
            "the ensemble's quorum",
            lambda: all(member.mode() is not None for member in self.running()),
            timeout,
        )

    def _find(self, mode: str) -> ZookeeperServer | None:
        return next((m for m in self.running() if m.mode() == mode), None)


@contextmanager
def standalone(workdir: Path, env: dict[str, str] | None = None) -> Iterator[ZookeeperServer]:
    server = ZookeeperServer(workdir, env=env or {})
    try:
        server.start().wait_serving()
        yield server
    finally:
        server.stop()


@contextmanager
def ensemble(workdir: Path, size: int = 3) -> Iterator[ZookeeperEnsemble]:
    peers = [f"server.{n}=127.0.0.1:{free_port()}:{free_port()}" for n in range(1, size + 1)]
    members = [
        ZookeeperServer(workdir / f"member{n}", myid=n, peers=peers) for n in range(1, size + 1)
    ]
    group = ZookeeperEnsemble(members)
    with ExitStack() as cleanup:
        for member in members:
            cleanup.callback(member.stop)
            member.start()
        group.wait_quorum()
        yield group


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZookeeperServer]:
    """A standalone server shared by the whole run."""
    with standalone(tmp_path_factory.mktemp("zookeeper")) as server:
        yield server


@pytest.fixture(scope="session")
def zookeeper_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZookeeperEnsemble]:
    """A three-member ensemble shared by the whole run; never stop its members."""
    with ensemble(tmp_path_factory.mktemp("ensemble")) as group:
        yield group


@pytest.fixture
def fresh_zookeeper(tmp_path: Path) -> Iterator[ZookeeperServer]:
    """A standalone server for one test, which may pause, kill or restart it."""
    with standalone(tmp_path / "zookeeper") as server:
        yield server


@pytest.fixture
def fresh_ensemble(tmp_path: Path) -> Iterator[ZookeeperEnsemble]:
    """A three-member ensemble for one test, which may stop its members."""
    with ensemble(tmp_path / "ensemble") as group:
        yield group
