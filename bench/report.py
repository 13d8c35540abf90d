"""Tables as Markdown (printed and written to ``docs/benchmarks.md``), and the machine and
versions they were measured on, which a number means nothing without."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

Table = list[list[str]]

PACKAGES = ("singleton-runner", "redis", "python-redis-lock", "pottery", "kazoo", "psycopg",
            "httpx", "pyinstrument")  # fmt: skip


def markdown(rows: Table) -> str:
    """A Markdown table; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |"

    rule = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "not found"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "?"


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def machine() -> Table:
    """What the run was measured on: host, load, Python, packages, servers."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rows: Table = [
        ["what", "value"],
        ["date", datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")],
        ["CPU", f"{_cpu()} x {os.cpu_count()}"],
        ["load average at start", load],
        ["kernel", platform.release()],
        ["Python", sys.version.split()[0]],
    ]
    for name in PACKAGES:
        try:
            rows.append([name, version(name)])
        except PackageNotFoundError:
            rows.append([name, "not installed"])
    redis_v = re.search(r"v=(\S+)", _first_line(["redis-server", "--version"]))
    rows.append(["redis-server", redis_v.group(1) if redis_v else "?"])
    rows.append(["etcd", _first_line(["etcd", "--version"]).removeprefix("etcd Version: ")])
    rows.append(
        ["PostgreSQL", _first_line(["/usr/lib/postgresql/15/bin/postgres", "--version"])]
    )
    zk = sorted(Path("/usr/share/java").glob("zookeeper-3*.jar"))
    rows.append(["ZooKeeper", zk[-1].stem.removeprefix("zookeeper-") if zk else "?"])
    java = _first_line(["java", "-version"])
    rows.append(["Java", java])
    return rows
