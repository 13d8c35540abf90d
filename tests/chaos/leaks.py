"""Check 5: nothing the campaign started outlives it — no process carrying the campaign's
marker in its environment (replicas and their job children, grandchildren included), no
server process, no server temp dir."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

MARKER = "SINGLETON_CHAOS_MARKER"


def marked(marker: str) -> list[int]:
    """Pids whose environment holds ``MARKER=marker`` (zombies included: an unreaped child is
    a leak too)."""
    needle = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "X"


def scan(marker: str, server_pids: Iterable[int], temp_dirs: Iterable[Path]) -> list[str]:
    leaks = [f"process {pid} still carries the campaign marker" for pid in marked(marker)]
    leaks += [f"server process {pid} still exists" for pid in server_pids if alive(pid)]
    leaks += [f"temp dir {d} still exists" for d in temp_dirs if d.exists()]
    return leaks
