"""The multi-process scenarios of :mod:`tests.test_replicas`, on Redis with ``appendonly yes``
and ``appendfsync always``; then what only a Redis server can do to a fleet: lose its data
in a restart without persistence, and pause past the lease's TTL.

Each replica is its own ``singleton run`` process; each job run writes through the SQLite
fencing guard into a sink that logs every write, applied or refused.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from singleton.backends.redis import KeySpace
from tests.replicas import events, fleet, sink_command, skewed, wait_for
from tests.servers.redis import RedisServer
from tests.test_replicas import (
    applied_by_run,
    sink_writes,
    test_a_replica_one_second_ahead_changes_nothing,
    test_a_second_signal_exits_at_once,
    test_every_firing_runs_exactly_once_across_three_replicas,
    test_sigkill_of_the_owner_mid_run_is_taken_over_within_the_ttl,
    test_sigstopped_owner_resumes_to_a_refused_write,
    test_sigterm_of_the_owner_hands_over_well_under_the_ttl,
)

pytestmark = [pytest.mark.slow, pytest.mark.server]

__all__ = [
    "test_a_replica_one_second_ahead_changes_nothing",
    "test_a_second_signal_exits_at_once",
    "test_every_firing_runs_exactly_once_across_three_replicas",
    "test_sigkill_of_the_owner_mid_run_is_taken_over_within_the_ttl",
    "test_sigstopped_owner_resumes_to_a_refused_write",
    "test_sigterm_of_the_owner_hands_over_well_under_the_ttl",
]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", aof=True).start()
    yield server
    server.stop()


@pytest.fixture
def backend_url(redis: RedisServer) -> str:
    return redis.url


def test_a_restart_without_persistence_never_runs_a_job_on_a_lower_token(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis", aof=False).start()
    sink = tmp_path / "sink.db"
    job = {"every": "1s", "command": sink_command(sink), "lock_ttl": "5s"}
    try:
        with fleet(tmp_path, server.url, {"tick": job}) as group:
            group.start_many(3)

            def everyone_ran() -> bool:
                runners = {row["replica"] for row in sink_writes(sink) if row["applied"]}
                return len(runners) == 3 and len(applied_by_run(sink)) >= 8

            wait_for("each replica to run the job", everyone_ran, timeout=60, every=0.5)
            server.restart(signal.SIGKILL)  # comes back empty: counter, ledger, lock
            restarted = time.time()
            before = max(row["token"] for row in sink_writes(sink) if row["applied"])

            def ran_since() -> list[object]:
                return [r for r in sink_writes(sink) if r["at"] > restarted + 1 and r["applied"]]

            wait_for("firings after the restart", lambda: len(ran_since()) >= 5, timeout=60)
            history = group.history("tick")
            counter = int(server.admin.get(KeySpace().job("tick").token) or 0)
            logs = [replica.log for replica in group.replicas.values()]
    finally:
        server.stop()
    regressions = [e for log in logs for e in events(log, "token_regression")]
    assert regressions, "no replica reported the token regression"
    assert all(e["level"] == "error" for e in regressions)
    assert max(int(str(e["highest"])) for e in regressions) >= before - 1
    assert counter > before, "the counter was not raised above the tokens issued before"
    # The fenced sink refused no write as stale: no job ran on a lower token after the
    # restart (a firing the server forgot may run again: it is refused as already applied).
    late = [r for r in sink_writes(sink) if r["at"] > restarted]
    assert not [r for r in late if r["reason"] == "StaleToken"], late
    assert all(r["token"] > before for r in late if r["applied"])
    # The new ledger holds no attempt that ran on a token at or below the old ones.
    ran = [a for a in history if a.state in ("running", "succeeded", "failed")]
    assert ran and all((a.token or 0) > before for a in ran), [(a.token, a.state) for a in ran]


def test_a_server_paused_past_the_ttl_stops_the_owners_job(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", aof=True).start()
    sink = tmp_path / "sink.db"
    job = {"every": "5s", "command": sink_command(sink, sleep=3.0), "lock_ttl": "2s"}
    try:
        with fleet(tmp_path, server.url, {"slow": job}, kill_grace="500ms") as group:
            group.start_many(3)
            first = wait_for("a running attempt", lambda: group.running("slow"), timeout=40)
            owner = group.owner_of(first)
            server.pause()
            paused_at = time.monotonic()
            try:

                def lost() -> list[dict[str, object]]:
                    return [e for e in events(owner.log, "lost") if e["run_id"] == first.run_id]

                wait_for("the owner to give its lease up", lost, timeout=6)
                assert time.monotonic() - paused_at < 2.0 + 0.5 + 0.5
                time.sleep(max(0.0, paused_at + 4.0 - time.monotonic()))  # past the ttl
            finally:
                server.resume()
            wait_for(
                "firings after the pause",
                lambda: [r for r in applied_by_run(sink) if r > first.run_id],
                timeout=20,
            )
            rows = group.ledger.attempts(first.run_id)
    finally:
        server.stop()
    # The paused attempt's job was stopped before it wrote; nothing ran twice.
    assert not [r for r in sink_writes(sink) if r["token"] == first.token]
    assert all(len(tokens) == 1 for tokens in applied_by_run(sink).values())
    assert rows[-1].token == first.token and rows[-1].state != "succeeded"


def test_a_replica_whose_clock_runs_ahead_starts_no_firing_before_its_instant(
    tmp_path: Path, backend_url: str
) -> None:
    """TESTING.md I9 (chaos finding 2): a host clock 3 s fast would start each firing 3 s
    early. Measured against the coordinator's clock (here Redis ``TIME``), the replica waits
    the difference out. The test's own clock is the true one: it notes when each firing
    first shows in the ledger."""
    job = {"every": "1s", "command": ["true"], "lock_ttl": "5s"}
    first_seen: dict[str, tuple[float, float]] = {}

    def five_seen() -> bool | None:
        now = time.time()
        for attempt in group.history("tick"):
            first_seen.setdefault(attempt.run_id, (now, attempt.scheduled_at.timestamp()))
        return len(first_seen) >= 5 or None

    with fleet(tmp_path, backend_url, {"tick": job}) as group:
        group.start("fast", skewed("+3s"))
        wait_for("five firings", five_seen, timeout=30, every=0.02)

    leads = [instant - seen for seen, instant in first_seen.values()]
    assert max(leads) < 0.5, f"firings showed up before their instants by {max(leads):.2f}s"
