"""Table 4: how long a firing waits for a standby when its owner dies or is stopped.

Two real ``singleton run`` processes per run, a job ``every: 2s`` that runs until stopped
(so the first firing's owner holds the lock and the other replica stands by). Once both
are ready and the job has started, the owner gets SIGKILL (no release: the standby must
wait for the lease to expire, so the time is bounded below by the TTL) or SIGTERM (a
graceful shutdown: the job is interrupted, the lease released, the standby woken). The
time is from the signal to the standby's job writing its first line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.servers import BACKENDS, CHILDREN, Coordinators
from bench.stats import Figure
from tests.servers import free_port

NOTE = """
Two `singleton run` processes, `lock_ttl: 3s` (ZooKeeper: `session_timeout: 3s`, since its
lock lives as long as the session), `shutdown_grace: 0s`. **kill**: SIGKILL to the owner
mid-run → the standby's job starts (bounded below by the TTL: nobody releases);
**term**: SIGTERM to the owner → the standby's job starts (the job is interrupted, its
attempt recorded `interrupted`, the lease released, the standby takes the firing over).
"""

TTL = 3.0
REPO = Path(__file__).resolve().parent.parent

CONFIG = """
backend:
  url: "{url}"
{options}
replica_id: "{replica}"
shutdown_grace: 0s
kill_grace: 1s
server:
  listen: "127.0.0.1:{port}"
jobs:
  {job}:
    every: 2s
    call: bench.targets:long_run
    lock_ttl: {ttl:g}s
    misfire_grace: 60s
"""


@dataclass
class Row:
    backend: str
    kill: list[float] = field(default_factory=list)
    term: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _starts(marks: Path) -> list[tuple[int, float]]:
    if not marks.exists():
        return []
    found = []
    for line in marks.read_text().splitlines():
        kind, pid, when, *_ = line.split()
        if kind == "start":
            found.append((int(pid), float(when)))
    return found


def _until(what: str, check: object, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > end:
            raise TimeoutError(what)
        time.sleep(0.01)


def one_run(servers: Coordinators, kind: str, run: int, sig: signal.Signals) -> float:
    """Seconds from ``sig`` to the standby's job start."""
    purpose = f"failover{run}{sig.name.lower()}"
    folder = servers.workdir / f"{purpose}-{kind}"
    folder.mkdir()
    marks = folder / "marks"
    url = servers.url(kind, purpose)
    options = "  session_timeout: 3s" if kind == "zookeeper" else ""
    ports = [free_port(), free_port()]
    procs = []
    env = dict(os.environ, PYTHONPATH=str(REPO), BENCH_MARKS=str(marks))
    try:
        for n, port in enumerate(ports):
            config = folder / f"replica{n}.yaml"
            config.write_text(CONFIG.format(url=url, options=options, replica=f"fo{n}",
                                            port=port, job=f"victim{run}", ttl=TTL))  # fmt: skip
            log = (folder / f"replica{n}.log").open("wb")
            procs.append(CHILDREN.add(subprocess.Popen(
                [sys.executable, "-m", "singleton", "run", str(config)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
            )))  # fmt: skip
            log.close()
        _until("replicas ready", lambda: all(_ready(p) for p in ports), 30)
        _until("the job started", lambda: _starts(marks), 30)
        time.sleep(1.0)
        owner_pid = _starts(marks)[0][0]
        signalled = time.time()
        os.kill(owner_pid, sig)

        def standby_started() -> bool:
            return any(pid != owner_pid for pid, _ in _starts(marks))

        _until("the standby started", standby_started, 30)
        return next(when for pid, when in _starts(marks) if pid != owner_pid) - signalled
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def measure(servers: Coordinators, runs: int = 3) -> list[Row]:
    rows = {kind: Row(kind) for kind in BACKENDS}
    for run in range(runs):
        for kind in BACKENDS:
            for sig, into in ((signal.SIGKILL, rows[kind].kill), (signal.SIGTERM, rows[kind].term)):
                try:
                    into.append(one_run(servers, kind, run, sig))
                except TimeoutError as exc:
                    rows[kind].failures.append(f"{sig.name}: {exc}")
    return list(rows.values())


def table(rows: list[Row]) -> list[list[str]]:
    out = [["backend", "ttl", "SIGKILL → standby starts", "SIGTERM → standby starts", "failed"]]
    for row in rows:
        ttl = f"{TTL:g} s" + (" (session)" if row.backend == "zookeeper" else "")
        out.append(
            [
                row.backend,
                ttl,
                Figure.of(row.kill).show(unit="s", scale=1, digits=2),
                Figure.of(row.term).show(unit="s", scale=1, digits=2),
                "; ".join(row.failures) or "0",
            ]
        )
    return out
