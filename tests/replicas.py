"""Several real ``singleton run`` processes on one backend, for multi-process tests.

Reusable by every backend: give :class:`Fleet` a backend URL and the job, start replicas
(each its own OS process, with ``SINGLETON_REPLICA_ID=r<i>``), and drive faults from the
ledger's state rather than from sleeps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import yaml

from singleton.backends import open_backend
from singleton.backends.base import Attempt, Backend
from singleton.clock import iso_z

ROOT = Path(__file__).resolve().parent.parent
FAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def skewed(offset: str) -> dict[str, str]:
    """The environment of a replica whose wall clock is ``offset`` (``"+3s"``) off; its
    monotonic clock stays true."""
    assert FAKETIME.exists(), "faketime is missing: run scripts/install-servers"
    return {
        "LD_PRELOAD": str(FAKETIME),
        "FAKETIME": offset,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }


T = TypeVar("T")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie counts as gone (whoever adopted it reaps it in its own
    time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.05) -> T:
    """Poll ``probe`` until it returns something truthy; fail naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def soon() -> str:
    """An ``anchor`` a few seconds from now, so an ``every: 30s`` job fires once, promptly,
    after replicas started even on a loaded machine."""
    return iso_z(datetime.now(UTC) + timedelta(seconds=4))


def sink_command(sink: Path, sleep: float = 0.0, ignore_term: bool = False) -> list[str]:
    command = [sys.executable, "-m", "tests.helpers.sink", str(sink), "--sleep", str(sleep)]
    return [*command, "--ignore-term"] if ignore_term else command


@dataclass
class Replica:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        """Pids whose parent is this replica (its running job commands)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == self.pid:
                found.append(int(entry.name))
        return found

    def signal_tree(self, signum: int) -> None:
        """Send ``signum`` to the replica and to its jobs' process groups (a job that ends
        meanwhile is no error)."""
        pgids = set()
        for child in self.children():
            with contextlib.suppress(ProcessLookupError):
                pgids.add(os.getpgid(child))
        os.kill(self.pid, signum)
        for pgid in pgids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signum)


@dataclass
class Fleet:
    """N replicas of one config on one backend."""

    workdir: Path
    backend_url: str
    jobs: dict[str, dict[str, object]]
    settings: dict[str, object] = field(default_factory=dict)
    replicas: dict[str, Replica] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.config = self.workdir / "config.yaml"
        body = {"backend": {"url": self.backend_url}, "jobs": self.jobs, **self.settings}
        self.config.write_text(yaml.safe_dump(body))
        self.ledger: Backend = open_backend(self.backend_url)

    def start(self, name: str, extra_env: dict[str, str] | None = None) -> Replica:
        log = self.workdir / f"{name}.log"
        env = dict(os.environ, SINGLETON_REPLICA_ID=name, PYTHONPATH=str(ROOT), **(extra_env or {}))
        command = [
            sys.executable,
            "-m",
            "singleton",
            "--log-format",
            "json",
            "run",
            str(self.config),
        ]
        with log.open("ab") as stderr:  # a restarted replica appends to its log
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=self.workdir
            )
        replica = Replica(name, process, log)
        self.replicas[name] = replica
        return replica

    def start_many(self, count: int) -> list[Replica]:
        return [self.start(f"r{i}") for i in range(1, count + 1)]

    def owner_of(self, attempt: Attempt) -> Replica:
        return self.replicas[attempt.replica]

    def history(self, job: str) -> list[Attempt]:
        return self.ledger.history(job, 0)

    def running(self, job: str) -> Attempt | None:
        return next((a for a in self.history(job) if a.state == "running"), None)

    def stop_all(self) -> None:
        for replica in self.replicas.values():
            if replica.process.poll() is None:
                try:
                    replica.signal_tree(signal.SIGCONT)
                except ProcessLookupError:
                    pass
                replica.process.send_signal(signal.SIGTERM)
        for replica in self.replicas.values():
            try:
                replica.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait()
        self.ledger.close()


def events(log: Path, kind: str) -> list[dict[str, object]]:
    """The JSON log lines of ``kind`` in a replica's log."""
    found = []
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == kind:
            found.append(record)
    return found


@contextmanager
def fleet(
    workdir: Path, backend_url: str, jobs: dict[str, dict[str, object]], **settings: object
) -> Iterator[Fleet]:
    """A :class:`Fleet` that is always stopped, whatever the test did to it."""
    group = Fleet(workdir, backend_url, jobs, dict(settings))
    try:
        yield group
    finally:
        group.stop_all()
