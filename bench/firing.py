"""Table 2: what the protocol adds to a firing, per backend, measured in a real runner.

A :class:`~singleton.runner.Runner` runs in this process (so the job can note its first and
last line on the same clock as the scheduler) with a 1-second job. Two spans per firing:
the schedule's instant → the job's first line (scheduler wake-up, thread start, acquire
with the ledger claim), and the job's last line → the lease released (outcome written under
the token, release). The fused backend calls themselves (``acquire_and_claim``,
``finish_and_release``) are timed on the side, and on Redis compared with a redis-py
``Lock`` acquire + release measured in the same round: the target is that the whole
protocol costs no more (both are two round trips when the fused paths work).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import redis

from bench.servers import BACKENDS, Coordinators
from bench.stats import Figure, median, percentile
from bench.targets import PROBE
from singleton.app import load
from singleton.events import Event
from singleton.logs import TextFormatter
from singleton.runner import Runner

F = TypeVar("F", bound=Callable[..., Any])

NOTE = """
A runner in the benchmark's own process, one job `every: 1s` (`call:` target that notes
its first and last line), logs at `info` to a file as `singleton run` writes them. The first
firing of each runner is a warm-up and not counted. **start** = schedule's instant → job's
first line; **finish** = job's last line → `released` (outcome written + lease released).
`acquire+claim` and `finish+release` time the fused backend calls alone; `protocol` is their
sum, against a redis-py `Lock` acquire + release measured in the same rounds, both in a
tight loop and under a firing's conditions (once a second, in a new thread, on a connection
idle in between): the target on Redis is protocol ≤ redis-py Lock, like for like. p99 is
over all firings pooled (with 18 firings, close to the maximum).
"""

CONFIG = """
backend:
  url: "{url}"
replica_id: bench-firing
shutdown_grace: 5s
jobs:
  probe:
    every: 1s
    call: bench.targets:probe
    lock_ttl: 10s
    misfire_grace: 30s
"""


@dataclass
class Row:
    backend: str
    start: list[list[float]] = field(default_factory=list)
    finish: list[list[float]] = field(default_factory=list)
    acquire: list[list[float]] = field(default_factory=list)
    release: list[list[float]] = field(default_factory=list)


def _timed(into: list[float], func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    return wrapper  # type: ignore[return-value]


def _log_to(path: Path) -> None:
    handler = logging.FileHandler(path)
    handler.setFormatter(TextFormatter())
    root = logging.getLogger("singleton")
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def one_runner(servers: Coordinators, kind: str, firings: int, row: Row) -> None:
    """Run one runner until ``firings`` + 1 firings are released; record all but the first."""
    folder = servers.workdir / f"firing-{kind}"
    folder.mkdir(exist_ok=True)
    config = folder / "singleton.yaml"
    config.write_text(CONFIG.format(url=servers.url(kind, "firing")))
    _log_to(folder / "runner.log")
    app = load(config)
    backend = app.open_backend()
    acquire: list[float] = []
    release: list[float] = []
    backend.acquire_and_claim = _timed(acquire, backend.acquire_and_claim)  # type: ignore[method-assign]
    backend.finish_and_release = _timed(release, backend.finish_and_release)  # type: ignore[method-assign]
    runner = Runner(app, backend)
    released: dict[str, float] = {}
    scheduled: dict[str, float] = {}
    done = threading.Event()

    def listen(event: Event) -> None:
        if event.kind == "released" and event.run_id:
            released[event.run_id] = time.time()
            if len(released) > firings:
                done.set()
        elif event.kind == "acquired" and event.run_id:
            scheduled[event.run_id] = 0.0

    runner.events.add(listen)
    thread = threading.Thread(target=runner.run, name="bench-runner", daemon=True)
    thread.start()
    cold: list[float] = []
    if kind == "redis":
        threading.Thread(target=_cold_cycles, args=(servers, done, cold), daemon=True).start()
    try:
        if not done.wait(firings + 30):
            raise RuntimeError(f"{kind}: only {len(released)} firings in {firings + 30} s")
    finally:
        runner.stop()
        thread.join(30)
        backend.close()
    ordered = sorted(released)[1:]  # run IDs sort by time; the first is the warm-up
    row.start.append([PROBE.first[r] - _instant(r) for r in ordered])
    row.finish.append([released[r] - PROBE.last[r] for r in ordered])
    row.acquire.append(acquire[1 : 1 + len(ordered)])
    row.release.append(release[1 : 1 + len(ordered)])
    if cold:
        COLD.append(median(cold[1:]))


def _instant(run_id: str) -> float:
    """The scheduled instant of a run ID (``job@2026-12-01T01:30:00Z``)."""
    from datetime import datetime

    return datetime.fromisoformat(run_id.split("@", 1)[1].replace("Z", "+00:00")).timestamp()


def _cold_cycles(servers: Coordinators, done: threading.Event, into: list[float]) -> None:
    """redis-py ``Lock`` acquire + release under a firing's conditions: once a second (half
    a second after the firings), each in a new thread, on a connection idle in between."""
    client = redis.Redis.from_url(servers.redis.url)
    lock = client.lock("base:firing-cold", timeout=30)

    def cycle() -> None:
        t0 = time.perf_counter()
        assert lock.acquire(blocking=False)
        lock.release()
        into.append(time.perf_counter() - t0)

    try:
        while not done.is_set():
            now = time.time()
            time.sleep(math.floor(now) + 1.5 - now)
            worker = threading.Thread(target=cycle)
            worker.start()
            worker.join()
    finally:
        client.close()


def redis_py_cycles(servers: Coordinators, count: int = 300) -> list[float]:
    """redis-py ``Lock`` acquire + release, the target's yardstick, in the same round."""
    client = redis.Redis.from_url(servers.redis.url)
    lock = client.lock("base:firing-yardstick", timeout=30)
    samples = []
    try:
        for i in range(count + 20):
            t0 = time.perf_counter()
            assert lock.acquire(blocking=False)
            lock.release()
            if i >= 20:
                samples.append(time.perf_counter() - t0)
    finally:
        client.close()
    return samples


def measure(servers: Coordinators, rounds: int = 3, firings: int = 6) -> list[Row]:
    rows = {kind: Row(kind) for kind in BACKENDS}
    yardstick: list[float] = []
    COLD.clear()
    for _ in range(rounds):
        for kind in BACKENDS:
            one_runner(servers, kind, firings, rows[kind])
            if kind == "redis":
                yardstick.append(median(redis_py_cycles(servers)))
    logging.getLogger("singleton").handlers.clear()
    result = list(rows.values())
    YARDSTICK[:] = yardstick
    return result


#: The redis-py Lock cycle medians of the last :func:`measure`, one per round: in a tight
#: loop (hot), and once a second in a new thread like a firing (cold).
YARDSTICK: list[float] = []
COLD: list[float] = []


def _fig(runs: list[list[float]]) -> str:
    return Figure.of([median(r) for r in runs]).show()


def _p99(runs: list[list[float]]) -> str:
    pooled = [x for r in runs for x in r]
    return f"{percentile(pooled, 99) * 1e3:.2f} ms" if pooled else "—"


def table(rows: list[Row]) -> list[list[str]]:
    out = [["backend", "start median", "start p99", "finish median", "finish p99",
            "acquire+claim", "finish+release", "protocol"]]  # fmt: skip
    for row in rows:
        protocol = [
            median(a) + median(r) for a, r in zip(row.acquire, row.release, strict=True)
        ]
        out.append(
            [
                row.backend,
                _fig(row.start),
                _p99(row.start),
                _fig(row.finish),
                _p99(row.finish),
                _fig(row.acquire),
                _fig(row.release),
                Figure.of(protocol).show(),
            ]
        )
    blank = ["", "", "", "", "", ""]
    if YARDSTICK:
        out.append(["redis-py Lock acquire+release, tight loop", *blank,
                    Figure.of(YARDSTICK).show()])  # fmt: skip
    if COLD:
        out.append(["redis-py Lock acquire+release, once a second in a new thread", *blank,
                    Figure.of(COLD).show()])  # fmt: skip
    return out
