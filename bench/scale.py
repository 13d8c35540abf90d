"""Table 5: many jobs. One replica with 10,000 jobs on a 60-second schedule (every job
fires in the same second, the worst case), and a fleet of five replicas sharing 1,000 jobs
on one Redis.

The replicas are real ``singleton run`` processes; CPU and RSS come from ``/proc``, drift
from the job's own first line (``bench.targets:drift``) minus the run's scheduled instant,
coordinator commands from Redis ``INFO commandstats``. Each one-minute window holds one
burst of firings; the ``anchor`` puts the first burst shortly after start-up so the run does
not wait for a wall-clock minute.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.contention import SCRIPT_INNER
from bench.servers import CHILDREN, Coordinators, process_stats
from bench.stats import Figure, median, percentile
from tests.servers import free_port

NOTE = """
Redis backend (no persistence), text logs at `info` to a file, jobs `every: 60s` with one
`anchor`, so each minute's firings all fall in the same second (the worst case for a
burst). A window is one minute from 1 s before a burst; figures are the median over two
windows (one with `--quick`), spread in brackets. **drift**: scheduled instant → the job's
first line, over all firings of the window. **Redis commands**: script calls and direct
commands Redis received; calls made inside the scripts are the next row (the server's own
work). **retakes**: job starts that were attempt 2 or later of their run: a replica found
the first attempt orphaned and took the firing over (the ledger records it `abandoned`;
fencing tokens guard the resource).
**repeats**: the same attempt of the same run started twice (must be 0).
"""

CONFIG_HEAD = """
backend:
  url: "{url}"
  prefix: "{prefix}"
replica_id: "{replica}"
server:
  listen: "127.0.0.1:{port}"
defaults:
  lock_ttl: 30s
  misfire_grace: 50s
jobs:
"""
JOB = '  j{n}: {{every: 60s, anchor: "{anchor}", call: "bench.targets:drift"}}\n'
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    """Per scenario and per window: what was measured."""

    label: str
    jobs: int
    replicas: int
    startup: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)  # CPU s per minute, all replicas
    rss: list[float] = field(default_factory=list)  # bytes, largest replica, window's end
    peak: list[float] = field(default_factory=list)
    drift_median: list[float] = field(default_factory=list)
    drift_p99: list[float] = field(default_factory=list)
    drift_max: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)  # job starts per window
    again: list[float] = field(default_factory=list)  # of which attempts 2+ (takeovers)
    repeated: list[float] = field(default_factory=list)  # an attempt started twice
    requests: list[float] = field(default_factory=list)
    inner: list[float] = field(default_factory=list)


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _redis_counts(servers: Coordinators) -> tuple[float, float]:
    requests = inner = 0.0
    for name, calls in servers.redis.commandstats().items():
        if name in ("info",):
            continue
        if name in SCRIPT_INNER:
            inner += calls
        else:
            requests += calls
    return requests, inner


def _drifts(marks: Path, instant: float) -> tuple[list[float], int, int]:
    """The drift of every job start of the firing at ``instant``; how many of those starts
    were a second (or later) attempt of a run (a takeover after a lost lease); and how many
    repeated an attempt already started (must be none)."""
    found = []
    again = 0
    seen: set[tuple[str, str]] = set()
    repeated = 0
    if marks.exists():
        for line in marks.read_text().splitlines():
            kind, _pid, when, scheduled, attempt, run_id = line.split()
            if kind == "start" and abs(float(scheduled) - instant) < 0.5:
                found.append(float(when) - instant)
                again += int(attempt) > 1
                repeated += (run_id, attempt) in seen
                seen.add((run_id, attempt))
    return found, again, repeated


def _sleep_until(wall: float) -> None:
    time.sleep(max(0.0, wall - time.time()))


def scenario(
    servers: Coordinators, label: str, jobs: int, replicas: int, windows: int, lead: float
) -> Result:
    """Start ``replicas`` with the same ``jobs``; measure ``windows`` one-minute windows."""
    result = Result(label, jobs, replicas)
    folder = servers.workdir / f"scale-{replicas}x{jobs}"
    folder.mkdir()
    marks = folder / "marks"
    anchor = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=lead)
    body = "".join(JOB.format(n=n, anchor=anchor.isoformat().replace("+00:00", "Z"))
                   for n in range(jobs))  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), BENCH_MARKS=str(marks))
    procs, ports = [], []
    try:
        began = time.monotonic()
        for n in range(replicas):
            port = free_port()
            config = folder / f"replica{n}.yaml"
            head = CONFIG_HEAD.format(url=servers.redis.url, prefix=f"scale{replicas}",
                                      replica=f"scale{n}", port=port)  # fmt: skip
            config.write_text(head + body)
            with (folder / f"replica{n}.log").open("wb") as log:
                procs.append(CHILDREN.add(subprocess.Popen(
                    [sys.executable, "-m", "singleton", "run", str(config)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder,
                )))  # fmt: skip
            ports.append(port)
        pending = set(range(replicas))
        while pending and time.monotonic() - began < lead - 2:
            for n in list(pending):
                if _ready(ports[n]):
                    result.startup.append(time.monotonic() - began)
                    pending.discard(n)
            time.sleep(0.05)
        if pending:
            raise RuntimeError(f"{label}: replicas {sorted(pending)} not ready within {lead} s")
        first = anchor.timestamp()
        _sleep_until(first - 1)
        cpu0 = sum(process_stats(p.pid)[0] for p in procs)
        counts0 = _redis_counts(servers)
        for window in range(windows):
            instant = first + 60 * window
            _sleep_until(instant + 59)
            stats = [process_stats(p.pid) for p in procs]
            counts1 = _redis_counts(servers)
            cpu1 = sum(s[0] for s in stats)
            result.cpu.append(cpu1 - cpu0)
            result.rss.append(max(s[1] for s in stats))
            result.peak.append(max(s[2] for s in stats))
            result.requests.append(counts1[0] - counts0[0])
            result.inner.append(counts1[1] - counts0[1])
            cpu0, counts0 = cpu1, counts1
            drifts, again, repeated = _drifts(marks, instant)
            result.started.append(len(drifts))
            result.again.append(again)
            result.repeated.append(repeated)
            result.drift_median.append(median(drifts))
            result.drift_p99.append(percentile(drifts, 99))
            result.drift_max.append(max(drifts) if drifts else math.nan)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
    return result


def measure(servers: Coordinators, quick: bool = False) -> list[Result]:
    windows = 1 if quick else 2
    one = 1_000 if quick else 10_000
    fleet = 200 if quick else 1_000
    return [
        scenario(servers, f"1 replica x {one:,} jobs", one, 1, windows, lead=25),
        scenario(servers, f"5 replicas x {fleet:,} jobs", fleet, 5, windows, lead=25),
    ]


def table(results: list[Result]) -> list[list[str]]:
    """One column per scenario (the rows would not fit across a page)."""

    def count(runs: list[float]) -> str:
        return Figure.of(runs).show(unit="", scale=1, digits=0)

    def seconds(runs: list[float], digits: int = 2) -> str:
        return Figure.of(runs).show(unit="s", scale=1, digits=digits)

    def mib(runs: list[float]) -> str:
        return Figure.of(runs).show(unit="MiB", scale=1 / 2**20, digits=0)

    lines: list[tuple[str, Callable[[Result], str]]] = [
        ("ready after start", lambda r: seconds(r.startup, 1)),
        ("CPU per minute, all replicas", lambda r: seconds(r.cpu, 1)),
        ("RSS at the window's end (largest replica)", lambda r: mib(r.rss)),
        ("peak RSS (largest replica)", lambda r: mib(r.peak)),
        ("drift median", lambda r: seconds(r.drift_median)),
        ("drift p99", lambda r: seconds(r.drift_p99)),
        ("drift max", lambda r: seconds(r.drift_max)),
        ("job starts per minute", lambda r: count(r.started)),
        ("of which retakes", lambda r: count(r.again)),
        ("repeats", lambda r: count(r.repeated)),
        ("Redis commands per minute", lambda r: count(r.requests)),
        ("calls inside scripts per minute", lambda r: count(r.inner)),
    ]
    out = [["", *(r.label for r in results)]]
    out += [[label, *(show(r) for r in results)] for label, show in lines]
    return out
