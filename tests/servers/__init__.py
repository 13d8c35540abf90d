"""Real coordinator servers for tests: each module starts one kind as a child process on a
free loopback port in a temp dir, waits until it serves, and stops it by pid at teardown.

A missing server binary is a failure, never a skip: CI installs them (scripts/install-servers).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str, *candidates: str) -> str:
    """The path of a server binary; fails the test (not skips it) when it is missing."""
    for path in (shutil.which(name), *candidates):
        if path and Path(path).exists():
            return path
    raise AssertionError(f"{name} is not installed: run scripts/install-servers")


def wait_until(what: str, ready: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``ready`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {timeout:g}s")
        time.sleep(0.02)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def stop(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0
) -> None:
    """Stop a server we started, by its pid; SIGKILL if it does not go in ``timeout``."""
    if process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGCONT)
            process.send_signal(sig)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        except ProcessLookupError:
            pass
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()
