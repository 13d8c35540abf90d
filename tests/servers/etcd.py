"""etcd for tests: a single node or a three-member cluster on one host.

Each member is an ``etcd`` child process on free loopback ports with its own data dir, started
as /work/shared/servers.md says, and stopped by its pid. Faults are plain signals (SIGKILL,
SIGSTOP/SIGCONT) and restarts on the same data dir; ``etcdctl`` does what an operator would.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers import binary, free_port, stop, wait_until

#: How long a member or a cluster may take to serve (a 3-member cluster takes about 2.5 s).
READY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Certificates:
    """A throwaway CA and a server certificate for 127.0.0.1 that it signed."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> Certificates:
    """Made with the openssl command line, as an operator would (EC keys: fast)."""
    folder.mkdir(parents=True, exist_ok=True)
    openssl = binary("openssl", "/usr/bin/openssl")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for command in (
        [
            "req",
            "-x509",
            *ec,
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=singleton test CA",
        ],
        ["req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"],
        [
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "san.cnf",
        ],
    ):
        subprocess.run([openssl, *command], cwd=folder, check=True, capture_output=True)
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")


def _open(
    url: str, tls: Certificates | None, data: bytes | None = None, timeout: float = 1.0
) -> dict[str, Any]:
    context = ssl.create_default_context(cafile=str(tls.ca)) if tls else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        result: dict[str, Any] = json.load(response)
        return result


@dataclass
class EtcdMember:
    """One etcd process: its ports, its data dir, and the signals a test sends it."""

    name: str
    client_port: int
    peer_port: int
    workdir: Path
    initial_cluster: str = ""
    tls: Certificates | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def client_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def _status(self) -> dict[str, Any]:
        return _open(f"{self.client_url}/v3/maintenance/status", self.tls, data=b"{}")

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self) -> None:
        """Start (or restart on the same data dir: etcd then ignores the --initial-* flags)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = [
            binary("etcd", "/usr/bin/etcd"),
            "--name",
            self.name,
            "--data-dir",
            str(self.data_dir),
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            self.initial_cluster,
            "--initial-cluster-state",
            "new",
        ]
        if self.tls:
            command += ["--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key)]
        with (self.workdir / "etcd.log").open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def healthy(self) -> bool:
        """Serving, with a leader: etcd's own /health."""
        try:
            return _open(f"{self.client_url}/health", self.tls, timeout=0.5).get("health") == "true"
        except OSError:
            return False

    def member_id(self) -> str:
        return str(self._status()["header"]["member_id"])

    def leader_id(self) -> str | None:
        try:
            return self._status().get("leader")
        except OSError:
            return None

    def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed or said to the peers."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)


@dataclass
class EtcdCluster:
    """One or more members that form one etcd cluster."""

    members: list[EtcdMember] = field(default_factory=list)

    def url(
        self,
        prefix: str = "/singleton",
        *,
        members: list[EtcdMember] | None = None,
        credentials: str = "",
    ) -> str:
        """An ``etcd://`` URL listing ``members`` (default: all, in order)."""
        hosts = ",".join(member.address for member in members or self.members)
        userinfo = f"{credentials}@" if credentials else ""
        return f"etcd://{userinfo}{hosts}{prefix}"

    def wait_healthy(self, timeout: float = READY_TIMEOUT) -> None:
        """Every running member serves and agrees on a leader."""

        def ready() -> bool:
            running = [m for m in self.members if m.running]
            if not all(m.healthy() for m in running):
                return False
            leaders = {m.leader_id() for m in running}
            return len(leaders) == 1 and None not in leaders

        wait_until(f"etcd cluster {[m.address for m in self.members]}", ready, timeout)

    def leader(self) -> EtcdMember:
        self.wait_healthy()
        ids = {member.member_id(): member for member in self.members if member.running}
        leader_id = next(m.leader_id() for m in self.members if m.running)
        return ids[str(leader_id)]

    def followers(self) -> list[EtcdMember]:
        leader = self.leader()
        return [m for m in self.members if m.running and m is not leader]

    def etcdctl(self, *args: str) -> str:
        """Run etcdctl against the running members, as an operator would; its stdout."""
        endpoints = ",".join(m.client_url for m in self.members if m.running)
        tls = self.members[0].tls
        if tls:
            args = (f"--cacert={tls.ca}", *args)
        done = subprocess.run(
            [binary("etcdctl", "/usr/bin/etcdctl"), f"--endpoints={endpoints}", *args],
            capture_output=True,
            text=True,
            timeout=20,
            env=dict(os.environ, ETCDCTL_API="3"),
            check=False,
        )
        assert done.returncode == 0, f"etcdctl {' '.join(args)}: {done.stderr.strip()}"
        return done.stdout

    def stop(self) -> None:
        for member in self.members:
            member.stop()


@contextmanager
def etcd_cluster(workdir: Path, size: int = 1, *, tls: bool = False) -> Iterator[EtcdCluster]:
    """``size`` members on free ports under ``workdir``, healthy, stopped at exit; with
    ``tls``, clients must speak TLS and trust ``cluster.members[0].tls.ca``."""
    certificates = make_certificates(workdir / "tls") if tls else None
    members = [
        EtcdMember(f"n{i}", free_port(), free_port(), workdir / f"n{i}", tls=certificates)
        for i in range(size)
    ]
    initial = ",".join(f"{m.name}={m.peer_url}" for m in members)
    cluster = EtcdCluster(members)
    try:
        for member in members:
            member.initial_cluster = initial
            member.start()
        cluster.wait_healthy()
        yield cluster
    finally:
        cluster.stop()
