"""``singleton.leader``: leadership in terms, each with its own fencing token.

Candidates in separate OS processes (``tests/helpers/campaign.py``) log ``gained``/``lost``
lines to a file; the tests follow those files and the SQLite lock row. The callback and
``terms()`` tests run the election in this process, with a separate connection standing in
for an operator who evicts the leader.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import singleton
import singleton.locking
from singleton.backends.base import owner_replica
from singleton.backends.sqlite import SqliteBackend
from singleton.errors import BackendUnavailable, LeaseLost
from singleton.locking import POLL, Held
from tests.replicas import ROOT, wait_for

NAME = "billing-scheduler"


pytest_plugins = ["tests.coordination"]


@dataclass
class Candidate:
    """A campaigning process (tests/helpers/campaign.py)."""

    process: subprocess.Popen[bytes]
    out: Path

    @property
    def replica(self) -> str:
        return f"{socket.gethostname()}-{self.process.pid}"

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines() if self.out.exists() else []

    def events(self, kind: str) -> list[int]:
        """The tokens of its ``gained`` or ``lost`` lines, in order."""
        return [int(line.split()[1]) for line in self.lines() if line.startswith(kind + " ")]

    @property
    def campaigning(self) -> bool:
        return "campaigning" in self.lines()


@pytest.fixture
def candidates(
    tmp_path: Path, url: str, backend: SqliteBackend
) -> Iterator[Callable[[int, str], list[Candidate]]]:
    """Starts campaigning processes and waits until each has begun; kills leftovers. The
    database exists before they start (``backend`` opened it), as in ``tests.replicas``."""
    started: list[Candidate] = []

    def start(count: int, ttl: str) -> list[Candidate]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        batch = []
        for _ in range(count):
            out = tmp_path / f"candidate-{len(started)}.log"
            command = [sys.executable, "-m", "tests.helpers.campaign", url, NAME, str(out)]
            process = subprocess.Popen([*command, "--ttl", ttl], env=env, cwd=tmp_path)
            started.append(Candidate(process, out))
            batch.append(started[-1])
        wait_for("every candidate to campaign", lambda: all(c.campaigning for c in batch), 5)
        return batch

    yield start
    for each in started:
        if each.process.poll() is None:
            each.process.kill()
        each.process.wait()


def the_leader(group: list[Candidate]) -> Candidate:
    return wait_for(
        "a leader", lambda: next((c for c in group if c.events("gained")), None), timeout=5
    )


@pytest.mark.slow
def test_of_two_campaigning_processes_exactly_one_leads(
    backend: SqliteBackend, candidates: Callable[[int, str], list[Candidate]]
) -> None:
    group = candidates(2, "1s")
    leader = the_leader(group)
    [follower] = [c for c in group if c is not leader]
    [token] = leader.events("gained")
    held = backend.holder(NAME)
    assert held is not None and held.token == token
    assert owner_replica(held.owner) == leader.replica
    # The follower tries again at least every POLL; over several of its tries and more than
    # a TTL of renewals, the leadership does not move.
    until = time.monotonic() + 3 * POLL + 1.0
    while time.monotonic() < until:
        assert follower.events("gained") == []
        assert leader.events("lost") == []
        time.sleep(0.05)  # the pace of the checks, not a synchronisation


@pytest.mark.slow
def test_sigkill_of_the_leader_hands_over_within_the_ttl_with_a_higher_token(
    candidates: Callable[[int, str], list[Candidate]],
) -> None:
    ttl = 1.0
    group = candidates(2, f"{ttl}s")
    leader = the_leader(group)
    [follower] = [c for c in group if c is not leader]
    [token] = leader.events("gained")
    leader.process.kill()
    killed_at = time.monotonic()
    leader.process.wait()
    [new_token] = wait_for("the follower to lead", lambda: follower.events("gained"), ttl + 1.0)
    assert time.monotonic() - killed_at < ttl + 1.0
    assert new_token > token


@pytest.mark.slow
def test_a_leader_that_resigns_hands_over_at_once(
    candidates: Callable[[int, str], list[Candidate]],
) -> None:
    ttl = 10.0
    group = candidates(2, f"{ttl}s")
    leader = the_leader(group)
    [follower] = [c for c in group if c is not leader]
    [token] = leader.events("gained")
    leader.process.send_signal(signal.SIGTERM)  # the helper leaves its `with` block
    resigned_at = time.monotonic()
    [new_token] = wait_for("the follower to lead", lambda: follower.events("gained"), ttl / 5)
    assert time.monotonic() - resigned_at < ttl / 5
    assert new_token > token
    assert leader.process.wait(timeout=5) == 0
    assert leader.lines()[-2:] == [f"lost {token} resigned", "resigned"]


def test_on_gain_and_on_loss_are_called_with_the_term(url: str, backend: SqliteBackend) -> None:
    gained: list[Held] = []
    lost: list[Held] = []
    with singleton.leader(
        NAME, url=url, ttl="1s", on_gain=gained.append, on_loss=lost.append
    ) as election:
        [term] = wait_for("a term", lambda: list(gained), timeout=3)
        assert election.current is term
        assert term.name == NAME and not term.lost
        held = backend.holder(NAME)
        assert held is not None and held.token == term.token
        assert lost == []
    assert lost == [term]
    assert term.lost and term.reason == "resigned"
    assert backend.holder(NAME) is None, "resigning releases the lock at once"


def test_terms_yields_a_term_per_gain(url: str, backend: SqliteBackend) -> None:
    gained: list[Held] = []
    with singleton.leader(NAME, url=url, ttl="1s", on_gain=gained.append) as election:
        terms = election.terms()
        wait_for("leadership", lambda: gained, timeout=3)
        first = next(terms)
        backend.evict(NAME)
        wait_for("a second term", lambda: len(gained) == 2, timeout=3)
        second = next(terms)
        assert [first, second] == gained
        assert first.lost and not second.lost
    assert list(terms) == [], "terms() ends when the election is resigned"


def test_an_evicted_term_is_lost_and_the_next_term_has_a_higher_token(
    url: str, backend: SqliteBackend
) -> None:
    gained: list[Held] = []
    lost: list[Held] = []
    with singleton.leader(
        NAME, url=url, ttl="1s", on_gain=gained.append, on_loss=lost.append
    ) as election:
        [first] = wait_for("a term", lambda: list(gained), timeout=3)
        backend.evict(NAME)
        wait_for("the term to end", lambda: lost, timeout=2)
        assert lost == [first] and first.lost
        assert first.reason is not None and "renewal refused" in first.reason
        with pytest.raises(LeaseLost):
            first.check()
        second = wait_for("a new term", lambda: gained[1:], timeout=2)[0]
        assert second.token > first.token
        assert election.current is second
        held = backend.holder(NAME)
        assert held is not None and held.token == second.token


def test_a_coordinator_error_while_waiting_does_not_end_the_campaign(
    url: str, backend: SqliteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = singleton.locking.shared_backend(url)
    real_wait = shared.wait
    failures: list[str] = []

    def wait_failing_once(name: str, timeout: float) -> None:
        if not failures:
            failures.append(name)
            raise BackendUnavailable("database is locked")
        real_wait(name, timeout)

    monkeypatch.setattr(shared, "wait", wait_failing_once)
    blocker = backend.try_acquire(NAME, 1.0, "blocker:1")
    assert blocker is not None
    gained: list[Held] = []
    with singleton.leader(NAME, url=url, ttl="1s", on_gain=gained.append):
        wait_for("the failing wait", lambda: failures, timeout=3)
        backend.release(blocker)
        wait_for("leadership after the error", lambda: gained, timeout=3)
