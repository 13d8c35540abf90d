"""Kill the process groups of running command jobs when the runner dies without a shutdown.

The parent-death signal (``setpriv --pdeathsig``) reaches a job's own process only: the
processes *it* started (the commands of a ``sh -c`` script, a worker pool) would outlive a
SIGKILLed runner and overlap the next owner's run. So the runner keeps one helper process
told which process groups run now, over a pipe. However the runner ends, its end of the
pipe closes, and the helper then SIGKILLs every group still listed and exits. A group is
struck off the list before its leader is reaped (:class:`~singleton.targets.CommandTarget`
keeps the leader unreaped until then), so the helper never signals a recycled group ID.

Why a process and not the kernel: a job's grandchildren carry no parent-death signal, and
the only kernel mechanisms that take a whole tree down (a PID namespace, a cgroup) need
privileges a sidecar rarely has. The helper is a few lines of Python started on the first
command job; it ignores terminal signals, so a Ctrl-C that reaches the whole foreground
process group does not take it down before the runner's own graceful shutdown.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

log = logging.getLogger("singleton.reaper")

#: The helper: read ``+ PGID`` / ``- PGID`` lines until end of input, then SIGKILL every
#: group still listed.
HELPER = """
import os, signal, sys
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
groups = set()
for line in sys.stdin:
    op, _, group = line.partition(" ")
    (groups.add if op == "+" else groups.discard)(int(group))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError:
        pass
"""


class Reaper:
    """The runner's side of the pipe; one per process (:data:`REAPER`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._helper: subprocess.Popen[bytes] | None = None
        self._broken = False

    def watch(self, pgid: int) -> None:
        """Kill group ``pgid`` if this process dies before :meth:`forget` is called."""
        self._send(f"+ {pgid}\n")

    def forget(self, pgid: int) -> None:
        """Group ``pgid`` is over (killed, its leader not yet reaped)."""
        self._send(f"- {pgid}\n")

    def _send(self, line: str) -> None:
        with self._lock:
            if self._broken:
                return
            try:
                if self._helper is None:
                    self._helper = self._start()
                pipe = self._helper.stdin
                assert pipe is not None
                pipe.write(line.encode())
                pipe.flush()
            except OSError as exc:
                # Jobs still run and are still stopped on every other path; only a SIGKILL
                # of the runner would now leave their children behind.
                self._broken = True
                log.warning(
                    "the job reaper is gone: a killed runner may leave job processes behind",
                    extra={"fields": {"error": str(exc)}},
                )

    @staticmethod
    def _start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-c", HELPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


#: The process's one reaper, started by the first command job.
REAPER = Reaper()
