"""``python -m bench.profile``: where a firing's time goes on Redis, and the A/B numbers
quoted in ``docs/benchmarks.md``.

It times the two fused calls a firing makes (``acquire_and_claim``, ``finish_and_release``)
against a redis-py ``Lock`` acquire + release, interleaved, and then profiles a whole firing
(``Firer.trigger`` in this thread, logs to a file) with pyinstrument. Run it once with and
once without ``hiredis`` installed to see what the parser costs.
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from datetime import UTC, datetime
from importlib.util import find_spec

import redis
from pyinstrument import Profiler

from bench.firing import _log_to
from bench.servers import coordinators, interruptible
from bench.stats import median
from singleton.app import load
from singleton.backends import open_backend
from singleton.backends.base import SUCCEEDED, Outcome, Run, new_owner
from singleton.clock import SYSTEM_CLOCK
from singleton.events import Events, log_event
from singleton.firing import Firer
from singleton.metrics import Metrics


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile")
    parser.add_argument("--count", type=int, default=3000)
    args = parser.parse_args()
    with interruptible(), coordinators() as servers:
        backend = open_backend(servers.redis.url)
        client = redis.Redis.from_url(servers.redis.url)
        lock = client.lock("profile:redis-py", timeout=30)
        acquire: list[float] = []
        release: list[float] = []
        yardstick: list[float] = []
        clock = time.perf_counter
        for i in range(args.count + 200):
            run = Run("profile", f"profile@manual-{uuid.uuid4()}", datetime.now(UTC))
            t0 = clock()
            got = backend.acquire_and_claim(run, 30.0, new_owner("bench"))
            t1 = clock()
            assert got is not None and got[1].attempt is not None
            backend.finish_and_release(run, got[0], got[1].attempt.attempt, Outcome(SUCCEEDED))
            t2 = clock()
            assert lock.acquire(blocking=False)
            lock.release()
            t3 = clock()
            if i >= 200:
                acquire.append(t1 - t0)
                release.append(t2 - t1)
                yardstick.append(t3 - t2)
        print(f"hiredis installed: {find_spec('hiredis') is not None}")
        print(f"acquire_and_claim   median {median(acquire) * 1e6:6.0f} us")
        print(f"finish_and_release  median {median(release) * 1e6:6.0f} us")
        print(f"protocol (sum)      median {(median(acquire) + median(release)) * 1e6:6.0f} us")
        print(f"redis-py Lock cycle median {median(yardstick) * 1e6:6.0f} us")
        client.close()

        folder = servers.workdir / "profile"
        folder.mkdir()
        (folder / "singleton.yaml").write_text(
            f'backend: {{url: "{servers.redis.url}"}}\n'
            "jobs:\n  probe: {every: 1s, call: bench.targets:probe, lock_ttl: 10s}\n"
        )
        _log_to(folder / "runner.log")
        app = load(folder / "singleton.yaml")
        events = Events("profile")
        events.add(log_event)
        events.add(Metrics("redis"))
        firer = Firer(backend, "profile", SYSTEM_CLOCK, events, threading.Event())
        job = app.jobs["probe"]
        for _ in range(200):
            firer.trigger(job)
        began = clock()
        for _ in range(args.count // 3):
            firer.trigger(job)
        print(f"whole firing (manual trigger, this thread): "
              f"{(clock() - began) / (args.count // 3) * 1e6:.0f} us")  # fmt: skip
        profiler = Profiler(interval=0.0001)
        profiler.start()
        for _ in range(args.count // 3):
            firer.trigger(job)
        profiler.stop()
        print(profiler.output_text(unicode=False, color=False))
        backend.close()


if __name__ == "__main__":
    main()
