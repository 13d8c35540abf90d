"""Three real ``singleton run`` processes on one backend, under real faults.

Each job run writes ``run_id token replica`` through the SQLite fencing guard into a sink
that logs every write, applied or refused. Faults are driven from the ledger's state.

The scenarios run on SQLite here; a backend's own module re-runs them by importing the test
functions and overriding the ``backend_url`` fixture.
"""

from __future__ import annotations

import itertools
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from singleton.backends.base import Attempt
from singleton.clock import parse_iso
from tests.replicas import alive, events, fleet, sink_command, skewed, soon, wait_for

pytestmark = pytest.mark.slow


def sink_writes(sink: Path) -> list[sqlite3.Row]:
    if not sink.exists():
        return []
    conn = sqlite3.connect(sink, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM writes ORDER BY seq").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def applied_by_run(sink: Path) -> dict[str, list[int]]:
    applied: dict[str, list[int]] = {}
    for row in sink_writes(sink):
        if row["applied"]:
            applied.setdefault(row["run_id"], []).append(row["token"])
    return applied


@pytest.fixture
def backend_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def test_every_firing_runs_exactly_once_across_three_replicas(
    tmp_path: Path, backend_url: str
) -> None:
    sink = tmp_path / "sink.db"
    job = {"every": "1s", "command": sink_command(sink), "lock_ttl": "5s"}
    with fleet(tmp_path, backend_url, {"tick": job}) as group:
        group.start_many(3)
        wait_for("30 firings", lambda: len(applied_by_run(sink)) >= 30, timeout=60, every=0.5)
        applied = applied_by_run(sink)

        def recorded() -> bool:
            done = {a.run_id for a in group.history("tick") if a.state == "succeeded"}
            return done >= set(applied)

        # A run's sink write lands before its owner records it succeeded.
        wait_for("every applied run to be recorded", recorded, timeout=10)
        history = group.history("tick")
    assert all(len(tokens) == 1 for tokens in applied.values()), applied
    assert not [row for row in sink_writes(sink) if not row["applied"]]
    succeeded: dict[str, int] = {}
    for attempt in history:
        if attempt.state == "succeeded":
            succeeded[attempt.run_id] = succeeded.get(attempt.run_id, 0) + 1
    assert set(succeeded) >= set(applied)
    assert max(succeeded.values()) == 1
    fired = sorted(parse_iso(run_id.split("@", 1)[1]) for run_id in applied)
    gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(fired)}
    assert gaps == {1.0}, f"firings were missed: gaps {gaps}"
    assert len({a.replica for a in history}) >= 2, "one replica did everything"


def test_sigkill_of_the_owner_mid_run_is_taken_over_within_the_ttl(
    tmp_path: Path, backend_url: str
) -> None:
    sink = tmp_path / "sink.db"
    job = {
        "every": "30s",
        "anchor": soon(),
        "command": sink_command(sink, sleep=2.0),
        "lock_ttl": "2s",
    }
    with fleet(tmp_path, backend_url, {"slow": job}) as group:
        group.start_many(3)
        first = wait_for("a running attempt", lambda: group.running("slow"), timeout=40)
        owner = group.owner_of(first)
        owner.process.send_signal(signal.SIGKILL)
        killed_at = time.time()
        group.replicas.pop(owner.name).process.wait()

        def takeover() -> object:
            rows = group.ledger.attempts(first.run_id)
            return rows if len(rows) >= 2 and rows[0].started_at else None

        rows = wait_for("the takeover", takeover, timeout=10)
        taken = rows[0].started_at
        assert taken is not None
        assert taken.timestamp() - killed_at < 2.0 + 1.0
        assert rows[0].replica != owner.name and rows[0].token > first.token
        assert rows[1].state == "abandoned"
        wait_for("the takeover's write", lambda: first.run_id in applied_by_run(sink), timeout=10)
    [write] = [r for r in sink_writes(sink) if r["run_id"] == first.run_id and r["applied"]]
    # The killed owner's job died with it, unless (on a loaded machine) it wrote before the
    # kill landed; either way the firing was applied once.
    assert write["token"] == rows[0].token or write["at"] < killed_at


def test_a_lone_replica_killed_mid_run_closes_that_firing_when_it_comes_back(
    tmp_path: Path, backend_url: str
) -> None:
    """Nobody stood by to take the firing over; without this, ``history`` would show it
    ``running`` until the ledger's retention dropped it."""
    # The first run lasts long enough to be killed; later ones end at once. One process,
    # no shell: the parent-death signal reaches the job's own process only.
    once = tmp_path / "ran-once"
    script = "import pathlib, sys, time\nflag = pathlib.Path(sys.argv[1])\n"
    script += "if not flag.exists():\n    flag.touch()\n    time.sleep(60)\n"
    job = {"every": "3s", "command": [sys.executable, "-c", script, str(once)], "lock_ttl": "2s"}
    with fleet(tmp_path, backend_url, {"nightly": job}) as group:
        group.start("r1")
        killed = wait_for("a running attempt", lambda: group.running("nightly"), timeout=20)
        wait_for("the job to start", once.exists, timeout=10)
        gone = group.replicas.pop("r1").process
        gone.kill()
        gone.wait()
        group.start("r1")

        def closed() -> Attempt | None:
            rows = group.ledger.attempts(killed.run_id)
            return rows[0] if rows[0].state != "running" else None

        assert wait_for("the killed firing closed", closed, timeout=20).state == "abandoned"
        assert len(group.ledger.attempts(killed.run_id)) == 1, "closed, not rerun"


def test_a_sigkilled_runner_takes_the_processes_its_job_started_with_it(
    tmp_path: Path, backend_url: str
) -> None:
    """The parent-death signal reaches the job's own process (the shell) only; the runner's
    reaper kills the rest of its process group (here the shell's ``sleep``)."""
    pidfile = tmp_path / "grandchild"
    script = f"sleep 60 & echo $! > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; wait"
    job = {"every": "30s", "anchor": soon(), "command": ["sh", "-c", script]}
    with fleet(tmp_path, backend_url, {"spawner": job}) as group:
        group.start("r1")
        wait_for("the job's child", pidfile.exists, timeout=40)
        child = int(pidfile.read_text())
        assert alive(child)
        gone = group.replicas.pop("r1").process
        gone.kill()
        gone.wait()
        wait_for("the job's child to die", lambda: not alive(child), timeout=10)


def test_sigstopped_owner_resumes_to_a_refused_write(tmp_path: Path, backend_url: str) -> None:
    sink = tmp_path / "sink.db"
    command = sink_command(sink, sleep=1.0, ignore_term=True)
    job = {"every": "30s", "anchor": soon(), "command": command, "lock_ttl": "2s"}
    with fleet(tmp_path, backend_url, {"paused": job}, kill_grace="1s") as group:
        group.start_many(3)
        first = wait_for("a running attempt", lambda: group.running("paused"), timeout=40)
        started = Path(f"{sink}.started-{first.token}")
        wait_for("the job to ignore SIGTERM", started.exists, timeout=5)
        owner = group.owner_of(first)
        owner.signal_tree(signal.SIGSTOP)

        def successor_wrote() -> object:
            return [t for t in applied_by_run(sink).get(first.run_id, []) if t > first.token]

        wait_for("the successor's write", successor_wrote, timeout=4.0 + 1.0)
        time.sleep(max(0.0, 4.0 - 2.0))
        owner.signal_tree(signal.SIGCONT)

        def stale_refused() -> object:
            return [r for r in sink_writes(sink) if r["token"] == first.token and not r["applied"]]

        wait_for("the stale owner's refused write", stale_refused, timeout=5)
        wait_for(
            "the stale attempt to be closed",
            lambda: group.ledger.attempts(first.run_id)[-1].state == "abandoned",
            timeout=5,
        )
    assert len(applied_by_run(sink)[first.run_id]) == 1


def test_sigterm_of_the_owner_hands_over_well_under_the_ttl(
    tmp_path: Path, backend_url: str
) -> None:
    sink = tmp_path / "sink.db"
    job = {
        "every": "30s",
        "anchor": soon(),
        "command": sink_command(sink, sleep=3.0),
        "lock_ttl": "10s",
    }
    with fleet(tmp_path, backend_url, {"handover": job}, shutdown_grace="200ms") as group:
        group.start_many(3)
        first = wait_for("a running attempt", lambda: group.running("handover"), timeout=40)
        owner = group.owner_of(first)
        owner.process.send_signal(signal.SIGTERM)
        stopped_at = time.time()

        def successor() -> object:
            rows = group.ledger.attempts(first.run_id)
            return rows[0] if len(rows) >= 2 and rows[0].started_at else None

        second = wait_for("a standby to take over", successor, timeout=10)
        assert owner.process.wait(timeout=10) == 0
        assert group.ledger.attempts(first.run_id)[1].state == "interrupted"
    assert second.started_at is not None
    assert second.started_at.timestamp() - stopped_at < 10 / 4


def test_a_replica_one_second_ahead_changes_nothing(tmp_path: Path, backend_url: str) -> None:
    sink = tmp_path / "sink.db"
    job = {"every": "1s", "command": sink_command(sink), "lock_ttl": "5s"}
    with fleet(tmp_path, backend_url, {"tick": job}) as group:
        group.start("r1")
        group.start("r2")
        group.start("fast", skewed("+1s"))
        wait_for("10 firings", lambda: len(applied_by_run(sink)) >= 10, timeout=30, every=0.5)
        history = group.history("tick")
    applied = applied_by_run(sink)
    assert all(len(tokens) == 1 for tokens in applied.values())
    # Where the coordinator has a clock (Redis, PostgreSQL) the fast replica waits out its
    # lead and may lose every race; it must still have taken part.
    fast_log = group.replicas["fast"].log
    took_part = [kind for kind in ("acquired", "standby", "skipped") if events(fast_log, kind)]
    assert took_part, "the skewed replica never took part: was it alive?"
    assert (
        max(sum(1 for a in history if a.run_id == r and a.state == "succeeded") for r in applied)
        == 1
    )


def test_a_second_signal_exits_at_once(tmp_path: Path, backend_url: str) -> None:
    sink = tmp_path / "sink.db"
    job = {"every": "30s", "anchor": soon(), "command": sink_command(sink, sleep=30.0)}
    with fleet(tmp_path, backend_url, {"long": job}, shutdown_grace="60s") as group:
        replica = group.start("r1")
        wait_for("a running attempt", lambda: group.running("long"), timeout=40)
        replica.process.send_signal(signal.SIGTERM)
        # Two signals sent before the runner handles the first would arrive as one (the kernel
        # and CPython both coalesce a pending signal), so send the second once it has.
        wait_for("the first signal", lambda: "shutting down" in replica.log.read_text(), 15)
        time.sleep(0.5)
        assert replica.process.poll() is None, "the first signal waits for the running job"
        replica.process.send_signal(signal.SIGTERM)
        # At once: long before the 60 s shutdown grace (a loaded CI machine may take seconds).
        assert replica.process.wait(timeout=15) == 1
    assert "second signal" in replica.log.read_text()
