"""Table 6: what an idle sidecar costs: import time, start-up to ready, idle RSS.

Import time is the wall time of a fresh interpreter importing the package minus one that
imports nothing (both measured in the same run, alternately). Start-up is from ``Popen``
to ``/readyz`` answering 200; RSS is read from ``/proc`` two seconds after that.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

from bench.servers import CHILDREN, Coordinators, process_stats
from bench.stats import Figure
from tests.servers import free_port

NOTE = """
`import` rows: a fresh `python -c "import …"` minus a fresh `python -c pass`, alternated.
**ready**: `Popen` of `singleton run` (one job, hourly cron) → `/readyz` 200; **idle RSS**:
two seconds later. SQLite is the default embedded backend; Redis loads a client library.
"""

CONFIG = """
backend:
  url: "{url}"
server:
  listen: "127.0.0.1:{port}"
jobs:
  hourly:
    cron: "0 * * * *"
    command: ["true"]
"""


@dataclass
class Result:
    imports: dict[str, list[float]] = field(default_factory=dict)
    ready: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, list[float]] = field(default_factory=dict)


def _wall(code: str) -> float:
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - began


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _start(servers: Coordinators, kind: str, run: int) -> tuple[float, float]:
    folder = servers.workdir / f"footprint-{kind}-{run}"
    folder.mkdir()
    port = free_port()
    config = folder / "singleton.yaml"
    config.write_text(CONFIG.format(url=servers.url(kind, f"footprint{run}"), port=port))
    began = time.perf_counter()
    with (folder / "replica.log").open("wb") as log:
        proc = CHILDREN.add(subprocess.Popen(
            [sys.executable, "-m", "singleton", "run", str(config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=folder,
        ))  # fmt: skip
    try:
        while not _ready(port):
            if proc.poll() is not None or time.perf_counter() - began > 30:
                raise RuntimeError(f"footprint {kind}: not ready, see {folder / 'replica.log'}")
            time.sleep(0.005)
        ready = time.perf_counter() - began
        time.sleep(2.0)
        return ready, float(process_stats(proc.pid)[1])
    finally:
        proc.kill()
        proc.wait(10)


def measure(servers: Coordinators, runs: int = 5) -> Result:
    result = Result()
    codes = {
        "import singleton": "import singleton",
        "import singleton.cli (what `singleton run` loads first)": "import singleton.cli",
    }
    for _ in range(runs):
        empty = _wall("pass")
        for label, code in codes.items():
            result.imports.setdefault(label, []).append(_wall(code) - empty)
        for kind in ("sqlite", "redis"):
            ready, rss = _start(servers, kind, len(result.ready.get(kind, [])))
            result.ready.setdefault(kind, []).append(ready)
            result.rss.setdefault(kind, []).append(rss)
    return result


def table(result: Result) -> list[list[str]]:
    out = [["what", "value"]]
    for label, runs in result.imports.items():
        out.append([label, Figure.of(runs).show(digits=0)])
    for kind, runs in result.ready.items():
        out.append([f"`singleton run` start-up to ready, {kind}", Figure.of(runs).show(digits=0)])
        rss = Figure.of(result.rss[kind]).show(unit="MiB", scale=1 / 2**20, digits=1)
        out.append([f"idle RSS, one job, {kind}", rss])
    return out


