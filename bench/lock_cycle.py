"""Table 1: one acquire + release, one client, loopback, per backend and per baseline.

The baselines are what a user would pick instead, run against the same servers in the same
round: redis-py's ``Lock``, python-redis-lock, pottery's ``Redlock`` (on the same three
nodes as our ``redlock://``), kazoo's ``Lock``, a bare ``SET NX PX`` + Lua delete, and two
``PING``s, the floor: no lock on Redis can take fewer than two round trips. Rounds
interleave every contender, so a burst of noise from the neighbours lands on all of them,
and each ratio is taken within its round before the median over rounds.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import pottery
import redis
import redis_lock  # type: ignore[import-untyped]
from kazoo.client import KazooClient

from bench.servers import BACKENDS, Coordinators
from bench.stats import Figure, median, percentile
from singleton.backends import open_backend
from singleton.backends.base import new_owner

Cycle = Callable[[], None]
FLOOR = "2 x Redis PING (floor)"
TTL = 30.0


@dataclass
class Row:
    """One contender's runs: per run the median, p99, ops/s and ratio to the floor."""

    name: str
    medians: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)


def _ours(stack: ExitStack, url: str, kind: str) -> Cycle:
    backend = open_backend(url)
    stack.callback(backend.close)
    name = f"cycle-{kind}"

    def cycle() -> None:
        lease = backend.try_acquire(name, TTL, new_owner("bench"))
        assert lease is not None, f"{kind}: the uncontended lock was busy"
        backend.release(lease)

    return cycle


def _baselines(stack: ExitStack, servers: Coordinators) -> dict[str, Cycle]:
    client = redis.Redis.from_url(servers.redis.url)
    stack.callback(client.close)
    nodes = [redis.Redis.from_url(node.url) for node in servers.redlock]
    for node in nodes:
        stack.callback(node.close)
    zk = KazooClient(hosts=servers.zookeeper.address)
    zk.start(timeout=30)
    stack.callback(zk.close)
    stack.callback(zk.stop)

    pylock = client.lock("base:redis-py", timeout=TTL)
    rlock = redis_lock.Lock(client, "base:python-redis-lock", expire=int(TTL))
    redlock = pottery.Redlock(key="base:pottery", masters=set(nodes), auto_release_time=TTL)
    kazoo_lock = zk.Lock("/bench-kazoo/lock", "bench")
    delete = client.register_script(
        "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end"
        " return 0"
    )

    def redis_py() -> None:
        assert pylock.acquire(blocking=False)
        pylock.release()

    def python_redis_lock() -> None:
        assert rlock.acquire(blocking=False)
        rlock.release()

    def pottery_redlock() -> None:
        assert redlock.acquire(blocking=False)
        redlock.release()

    def kazoo() -> None:
        assert kazoo_lock.acquire(timeout=5)
        kazoo_lock.release()

    def bare() -> None:
        token = uuid.uuid4().hex
        assert client.set("base:bare", token, nx=True, px=int(TTL * 1000))
        delete(keys=["base:bare"], args=[token])

    def floor() -> None:
        client.ping()
        client.ping()

    return {
        "redis-py Lock": redis_py,
        "python-redis-lock": python_redis_lock,
        "pottery Redlock (3 nodes)": pottery_redlock,
        "kazoo Lock": kazoo,
        "SET NX PX + Lua delete": bare,
        FLOOR: floor,
    }


@contextmanager
def contenders(servers: Coordinators) -> Iterator[dict[str, Cycle]]:
    with ExitStack() as stack:
        found = {f"singleton {kind}": _ours(stack, servers.url(kind, "cycle"), kind)
                 for kind in BACKENDS}  # fmt: skip
        found.update(_baselines(stack, servers))
        yield found


def _time(cycle: Cycle, count: int, budget: float) -> tuple[list[float], float]:
    """Up to ``count`` cycles or ``budget`` seconds: the latencies and the elapsed time."""
    samples: list[float] = []
    clock = time.perf_counter
    began = clock()
    stop = began + budget
    for _ in range(count):
        t0 = clock()
        cycle()
        t1 = clock()
        samples.append(t1 - t0)
        if t1 > stop:
            break
    return samples, clock() - began


def measure(
    servers: Coordinators, rounds: int = 5, count: int = 400, budget: float = 1.5
) -> list[Row]:
    """``rounds`` rounds over every contender, ``count`` cycles (or ``budget`` s) each."""
    with contenders(servers) as found:
        rows = {name: Row(name) for name in found}
        for cycle in found.values():  # warm up: connections, scripts loaded, JIT-free caches
            _time(cycle, 30, 1.0)
        for _ in range(rounds):
            floor = 0.0
            for name, cycle in found.items():
                samples, elapsed = _time(cycle, count, budget)
                row = rows[name]
                row.medians.append(median(samples))
                row.p99s.append(percentile(samples, 99))
                row.rates.append(len(samples) / elapsed)
                if name == FLOOR:
                    floor = row.medians[-1]
            for row in rows.values():
                row.ratios.append(row.medians[-1] / floor)
        return list(rows.values())


def table(rows: list[Row]) -> list[list[str]]:
    """Latencies in microseconds: the floor is well under a millisecond."""
    header = [["contender", "median", "p99", "ops/s", "x floor"]]
    return header + [
        [
            row.name,
            Figure.of(row.medians).show(unit="us", scale=1e6, digits=0),
            Figure.of(row.p99s).show(unit="us", scale=1e6, digits=0),
            Figure.of(row.rates).show(unit="", scale=1, digits=0),
            Figure.of(row.ratios).show(unit="", scale=1, digits=1),
        ]
        for row in rows
    ]

NOTE = """
One client, one lock, acquire then release, on loopback; `x floor` is the round's median
over the round's two-`PING` median (no lock on Redis can cost less than two round trips).
Our backends are called through the backend interface (`try_acquire` + `release`, a new
unique owner per acquisition); SQLite has no server and is listed for scale. Redlock and
pottery use the same three Redis nodes; kazoo and our ZooKeeper the same server.
"""
