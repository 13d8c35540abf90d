"""``singleton.lock``: the coordinator's lock in the user's own code, across real processes.

The other party is an OS process of its own (``tests/helpers/lock_holder.py``) that logs what
it sees to a file; the tests follow it from that file and from the SQLite backend's lock row,
never from sleeps. Every test uses a SQLite file of its own.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

import singleton
import singleton.locking
from singleton.backends import open_backend
from singleton.backends.base import new_owner
from singleton.backends.sqlite import SqliteBackend
from singleton.errors import ConfigError, LeaseLost, LockBusy
from tests.firing_support import LateFirstReply
from tests.replicas import ROOT, wait_for

NAME = "compact"
SINGLETON = Path(sys.executable).with_name("singleton")


pytest_plugins = ["tests.coordination"]


@dataclass
class HolderProcess:
    """A ``singleton.lock`` holder in another process (tests/helpers/lock_holder.py)."""

    process: subprocess.Popen[bytes]
    out: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines() if self.out.exists() else []

    def acquired(self) -> int:
        """The token, once the holder is inside its ``with`` block."""

        def token() -> int | None:
            for line in self.lines():
                if line.startswith("acquired "):
                    return int(line.split()[1])
            assert self.process.poll() is None, f"holder exited early: {self.lines()}"
            return None

        return wait_for("the holder to acquire the lock", token, timeout=5)

    def leaving(self) -> bool:
        return any(line.startswith("leaving ") for line in self.lines())

    def stop(self) -> int:
        """Make the holder leave its block (SIGTERM) and return its exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self) -> int:
        return self.process.wait(timeout=10)


@pytest.fixture
def holder(tmp_path: Path, url: str) -> Iterator[Callable[..., HolderProcess]]:
    """Starts holders of ``NAME``; each is killed at the end if the test left it running."""
    started: list[HolderProcess] = []

    def start(ttl: str = "5s", hold: str | None = None) -> HolderProcess:
        out = tmp_path / f"holder-{len(started)}.log"
        command = [sys.executable, "-m", "tests.helpers.lock_holder", url, NAME, str(out)]
        command += ["--ttl", ttl] + (["--hold", hold] if hold is not None else [])
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("SINGLETON_BACKEND__URL", None)
        started.append(HolderProcess(subprocess.Popen(command, env=env, cwd=tmp_path), out))
        return started[-1]

    yield start
    for each in started:
        if each.process.poll() is None:
            each.process.kill()
        each.process.wait()


@pytest.mark.slow
def test_a_held_lock_is_busy_for_another_process_and_names_the_holder(
    url: str, holder: Callable[..., HolderProcess]
) -> None:
    other = holder()
    token = other.acquired()
    with pytest.raises(LockBusy) as busy, singleton.lock(NAME, url=url, wait=0):
        pytest.fail("entered a lock that another process holds")
    assert f"{socket.gethostname()}-{other.pid}:" in str(busy.value)
    assert f"token {token}" in str(busy.value)
    assert other.stop() == 0
    assert other.lines()[-1] == "released"


@pytest.mark.slow
def test_wait_gets_the_lock_once_the_holder_releases(
    url: str, holder: Callable[..., HolderProcess]
) -> None:
    other = holder(hold="1s")
    first = other.acquired()
    asked = time.monotonic()
    with singleton.lock(NAME, url=url, wait="5s") as held:
        waited = time.monotonic() - asked
        assert other.leaving(), "got the lock while the other process was still in its block"
        assert held.token > first
    assert waited < 4.0, f"waited {waited:.2f}s for a lock released after about 1s"
    assert other.wait() == 0


@pytest.mark.slow
def test_wait_raises_lock_busy_when_the_holder_keeps_the_lock_past_it(
    url: str, holder: Callable[..., HolderProcess]
) -> None:
    other = holder()
    token = other.acquired()
    asked = time.monotonic()
    with (
        pytest.raises(LockBusy, match=f"token {token}"),
        singleton.lock(NAME, url=url, wait="700ms"),
    ):
        pytest.fail("entered a lock that another process holds")
    assert 0.7 <= time.monotonic() - asked < 3.0
    assert other.stop() == 0


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [
        (2, 2.0),
        (2.5, 2.5),
        (timedelta(seconds=3), 3.0),
        ("500ms", 0.5),
        ("1m30s", 90.0),
    ],
    ids=["int", "float", "timedelta", "500ms", "1m30s"],
)
def test_ttl_accepts_seconds_timedelta_and_duration_text(
    url: str, backend: SqliteBackend, ttl: float | timedelta | str, seconds: float
) -> None:
    with singleton.lock(NAME, url=url, ttl=ttl) as held:
        seen = backend.holder(NAME)
        assert seen is not None and seen.expires_in is not None
        assert seconds - 0.25 < seen.expires_in <= seconds
        assert 0 < held.remaining() <= seconds


@pytest.mark.parametrize("ttl", ["500", "-1s", -1, "soon", 0, "0s", timedelta(0)])
def test_a_ttl_that_is_not_a_duration_is_a_config_error(url: str, ttl: float | str) -> None:
    with pytest.raises(ConfigError), singleton.lock(NAME, url=url, ttl=ttl):
        pytest.fail("entered a lock with a bad ttl")


@pytest.mark.slow
def test_a_block_three_times_the_ttl_keeps_the_lock(
    backend: SqliteBackend, holder: Callable[..., HolderProcess]
) -> None:
    other = holder(ttl="1s", hold="3s")
    token = other.acquired()
    intruder = new_owner("intruder")
    checks = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # Read the lock first, then whether the holder was leaving: a free lock is only
        # allowed once the holder had started to leave.
        seen = backend.holder(NAME)
        stolen = backend.try_acquire(NAME, 5.0, intruder)
        if other.leaving():
            if stolen is not None:
                backend.release(stolen)
            break
        assert stolen is None, f"another process took the lock after {checks} checks"
        assert seen is not None and seen.token == token
        checks += 1
        time.sleep(0.05)  # the pace of the checks, not a synchronisation
    else:
        pytest.fail(f"the holder never left its block: {other.lines()}")
    assert checks >= 20, "too few checks to cover three TTLs"
    assert other.wait() == 0
    assert other.lines()[-2:] == ["leaving lost=False", "released"]


@pytest.mark.slow
def test_a_lease_taken_away_mid_block_is_lost_and_leaving_raises_lease_lost(
    tmp_path: Path, url: str
) -> None:
    config = tmp_path / "singleton.yaml"
    config.write_text(yaml.safe_dump({"backend": {"url": url}}))
    with (
        pytest.raises(LeaseLost, match=r"lock 'compact' \(token \d+\) was lost"),
        singleton.lock(NAME, url=url, ttl="1s") as held,
    ):
        unlock = subprocess.run(
            [str(SINGLETON), "unlock", str(config), NAME, "--force"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert unlock.returncode == 0, unlock.stderr
        assert f"(token {held.token})" in unlock.stdout
        assert held.wait_lost(timeout=2.0), "the holder never noticed it lost the lease"
        assert held.lost
        assert held.reason is not None and "renewal refused" in held.reason
        assert held.remaining() == 0


def test_an_exception_raised_in_the_block_is_not_replaced_by_lease_lost(
    url: str, backend: SqliteBackend
) -> None:
    with (
        pytest.raises(RuntimeError, match="the block's own error"),
        singleton.lock(NAME, url=url, ttl="1s") as held,
    ):
        backend.evict(NAME)
        assert held.wait_lost(timeout=2.0)
        raise RuntimeError("the block's own error")


@pytest.mark.slow
def test_tokens_increase_across_successive_holders_in_different_processes(
    url: str, holder: Callable[..., HolderProcess]
) -> None:
    tokens = []
    for _ in range(3):
        other = holder(hold="0s")
        tokens.append(other.acquired())
        assert other.wait() == 0
    with singleton.lock(NAME, url=url) as held:
        tokens.append(held.token)
    other = holder(hold="0s")
    tokens.append(other.acquired())
    assert other.wait() == 0
    assert all(a < b for a, b in itertools.pairwise(tokens)), tokens


def test_many_lock_cycles_open_the_backend_once(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    opened = []

    def counting_open(url: str, **options: object) -> object:
        opened.append(open_backend(url, **options))
        return opened[-1]

    monkeypatch.setattr(singleton.locking, "open_backend", counting_open)
    tokens = []
    for _ in range(25):
        with singleton.lock(NAME, url=url, ttl="5s") as held:
            tokens.append(held.token)
    assert len(opened) == 1
    assert singleton.locking._shared == {url: opened[0]}
    assert all(a < b for a, b in itertools.pairwise(tokens))


def test_the_default_url_comes_from_singleton_backend_url(
    url: str, backend: SqliteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SINGLETON_BACKEND__URL", url)
    with singleton.lock(NAME) as held:
        seen = backend.holder(NAME)
        assert seen is not None and seen.token == held.token


def test_no_url_and_no_environment_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SINGLETON_BACKEND__URL", raising=False)
    with pytest.raises(ConfigError, match="SINGLETON_BACKEND__URL"), singleton.lock(NAME):
        pytest.fail("entered a lock without a backend")


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 129, "caf\u00e9", "a:b"])
def test_a_bad_lock_name_is_a_config_error(url: str, name: str) -> None:
    with pytest.raises(ConfigError, match="lock name"), singleton.lock(name, url=url):
        pytest.fail(f"entered a lock named {name!r}")
    assert singleton.locking._shared == {}, "a bad name must be refused before connecting"


def test_a_grant_read_after_its_deadline_is_let_go_and_the_lock_taken_again(
    tmp_path: Path,
) -> None:
    """TESTING F2b: a pause between the acquire's send and its reply."""
    backend = LateFirstReply(f"sqlite:///{tmp_path / 'state.db'}", late=1.6)
    try:
        lease = singleton.locking.acquire(backend, NAME, ttl=1.5, wait=10.0)
        assert lease.token > backend.first_token > 0
        assert time.monotonic() < lease.deadline
    finally:
        backend.close()
