"""Holds ``singleton.lock`` in a process of its own, for multi-process lock tests.

Usage: python -m tests.helpers.lock_holder URL NAME OUT [--ttl T] [--wait W] [--hold D]

Appends one line per event to OUT, each flushed at once, so a test can follow the holder
from the file: ``acquired <token>``; ``leaving lost=<True|False>`` as the ``with`` block
ends; then ``released`` (exit 0), or ``lease-lost <message>`` (exit 4). A busy lock gives
``busy <message>`` (exit 3). The block lasts ``--hold`` (a duration such as ``3s``), or
until SIGTERM when no ``--hold`` is given.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import singleton
from singleton.durations import parse_duration
from singleton.errors import LeaseLost, LockBusy

EXIT_BUSY = 3
EXIT_LEASE_LOST = 4


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("name")
    parser.add_argument("out", type=Path)
    parser.add_argument("--ttl", default="5s")
    parser.add_argument("--wait", default="0s")
    parser.add_argument("--hold", default=None)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    hold = None if args.hold is None else parse_duration(args.hold)

    def note(line: str) -> None:
        with args.out.open("a") as out:
            out.write(line + "\n")
            out.flush()

    try:
        with singleton.lock(args.name, url=args.url, ttl=args.ttl, wait=args.wait) as held:
            note(f"acquired {held.token}")
            stop.wait(hold)
            note(f"leaving lost={held.lost}")
    except LockBusy as exc:
        note(f"busy {exc}")
        return EXIT_BUSY
    except LeaseLost as exc:
        note(f"lease-lost {exc}")
        return EXIT_LEASE_LOST
    note("released")
    return 0


if __name__ == "__main__":
    sys.exit(main())
