"""Job targets the benchmarks schedule (``call: bench.targets:<name>``).

They note times in the job itself, because "the job's first line" is what a user feels:
everything before it (scheduler wake-up, thread start, acquire, claim) is overhead.
Replicas run as separate processes write to the file named by ``BENCH_MARKS`` with one
``os.write`` per line (``O_APPEND``: lines from many threads and processes never tear).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from singleton.context import JobContext


@dataclass
class Probe:
    """In-process observations: per run ID, the wall time of the job's first and last line."""

    first: dict[str, float] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    hold: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)


PROBE = Probe()


def probe(ctx: JobContext) -> None:
    """First line, an optional hold, last line."""
    started = time.time()
    if PROBE.hold:
        time.sleep(PROBE.hold)
    with PROBE.lock:
        PROBE.first[ctx.run_id] = started
        PROBE.last[ctx.run_id] = time.time()


def _mark(kind: str, ctx: JobContext) -> None:
    path = os.environ["BENCH_MARKS"]
    line = (
        f"{kind} {os.getpid()} {time.time():.6f} {ctx.scheduled_at.timestamp():.3f}"
        f" {ctx.attempt} {ctx.run_id}\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def drift(ctx: JobContext) -> None:
    """Scale: note the start, do nothing else."""
    _mark("start", ctx)


def long_run(ctx: JobContext) -> None:
    """Failover: note the start, then run until stopped (lease lost, shutdown)."""
    _mark("start", ctx)
    end = time.monotonic() + 120
    while not ctx.lost and time.monotonic() < end:
        time.sleep(0.01)
