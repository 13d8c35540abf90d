"""Campaigns with ``singleton.leader`` in a process of its own, for multi-process tests.

Usage: python -m tests.helpers.campaign URL NAME OUT [--ttl T]

Appends one line per event to OUT, each flushed at once: ``campaigning`` once the election
has started, ``gained <token>`` and ``lost <token> <reason>`` from the callbacks, and
``resigned`` after SIGTERM made it leave the ``with`` block (exit 0).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import singleton
from singleton.locking import Held


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("name")
    parser.add_argument("out", type=Path)
    parser.add_argument("--ttl", default="5s")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    writing = threading.Lock()

    def note(line: str) -> None:
        with writing, args.out.open("a") as out:
            out.write(line + "\n")
            out.flush()

    def gained(term: Held) -> None:
        note(f"gained {term.token}")

    def lost(term: Held) -> None:
        note(f"lost {term.token} {term.reason}")

    with singleton.leader(args.name, url=args.url, ttl=args.ttl, on_gain=gained, on_loss=lost):
        note("campaigning")
        while not stop.wait(0.1):
            pass
    note("resigned")
    return 0


if __name__ == "__main__":
    sys.exit(main())
