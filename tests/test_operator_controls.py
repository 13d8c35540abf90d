"""Operator controls with real ``singleton run`` processes on SQLite (and, re-exported by
tests/test_operator_controls_redis.py, on Redis): pause and resume from the CLI, catch-up
after the whole fleet was down, backfill, each overlap policy with a job longer than its
interval, and the timeout of a command that ignores SIGTERM.

Job commands append ``start|end RUN_ID TOKEN EPOCH`` lines to a file (one write each, with
O_APPEND), so a test can see which firings ran, when, and whether runs overlapped.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from singleton.clock import iso_z, parse_iso
from singleton.schedule import every_schedule, fires_between, run_id
from tests.replicas import ROOT, Fleet, fleet, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def backend_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def span_command(out: Path, seconds: float, ignore_term: bool = False) -> list[str]:
    """A job that logs its start and end to ``out`` and takes ``seconds`` in between."""
    trap = "trap '' TERM; " if ignore_term else ""
    line = '"$SINGLETON_RUN_ID $SINGLETON_FENCING_TOKEN $(date +%s.%N)"'
    return [
        "sh",
        "-c",
        f"{trap}echo start {line} >> {out}; sleep {seconds}; echo end {line} >> {out}",
    ]


@dataclass(frozen=True)
class Span:
    run_id: str
    token: int
    start: float
    end: float | None


def spans(out: Path) -> list[Span]:
    """Each run the job logged (a run ID twice if it ran twice), in the order it started."""
    starts: list[tuple[str, int, float]] = []
    ends: dict[tuple[str, int], float] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            kind, rid, token, at = line.split()
            if kind == "start":
                starts.append((rid, int(token), float(at)))
            else:
                ends[(rid, int(token))] = float(at)
    found = [Span(rid, token, at, ends.get((rid, token))) for rid, token, at in starts]
    return sorted(found, key=lambda span: span.start)


def started_once_each(found: list[Span]) -> bool:
    return len({span.run_id for span in found}) == len(found)


def never_overlap(found: list[Span]) -> bool:
    return all(a.end is not None and a.end <= b.start + 0.05 for a, b in itertools.pairwise(found))


def cli(*args: object, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "singleton", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def schedule_from(group: Fleet) -> dict[str, datetime]:
    """Where each replica's schedule starts (its ``started`` log line)."""
    found = {}
    for name, replica in group.replicas.items():
        for line in replica.log.read_text().splitlines():
            record = json.loads(line)
            if "schedule_from" in record:
                found[name] = parse_iso(record["schedule_from"])
    return found


# --- pause and resume ------------------------------------------------------------------------


def test_a_pause_from_the_cli_stops_every_replica_until_resume(
    tmp_path: Path, backend_url: str
) -> None:
    out = tmp_path / "runs.log"
    jobs = {"tick": {"every": "1s", "command": span_command(out, 0)}}
    with fleet(tmp_path, backend_url, jobs, shutdown_grace="1s") as group:
        group.start_many(3)
        wait_for("two runs", lambda: len(spans(out)) >= 2, timeout=20)

        paused = cli("pause", group.config, "tick", "--note", "migrating the table")
        assert paused.returncode == 0, paused.stderr
        paused_at = time.time()
        time.sleep(4)
        status = cli("status", group.config, "--json")
        resumed = cli("resume", group.config, "tick")
        resumed_at = time.time()
        wait_for("a run after resume", lambda: spans(out)[-1].start > resumed_at, timeout=10)
        rows = group.history("tick")

    assert "tick paused by" in paused.stdout and "migrating the table" in paused.stdout
    assert resumed.returncode == 0 and resumed.stdout.strip() == "resumed tick"
    assert not [s for s in spans(out) if paused_at < s.start < resumed_at], "nothing ran paused"
    assert started_once_each(spans(out))
    [job] = json.loads(status.stdout)["jobs"]
    assert job["paused"]["note"] == "migrating the table"
    assert job["paused"]["until"] is None and "@" in job["paused"]["by"]
    skipped = [
        a
        for a in rows
        if a.state == "skipped" and paused_at + 1 < a.scheduled_at.timestamp() < resumed_at - 1
    ]
    assert len(skipped) >= 2 and {a.reason for a in skipped} == {"paused"}
    per_firing = [a.run_id for a in rows]
    assert len(per_firing) == len(set(per_firing)), "each skipped firing is recorded once"


def test_pause_refuses_an_unknown_job_and_a_past_until(tmp_path: Path, backend_url: str) -> None:
    with fleet(tmp_path, backend_url, {"tick": {"every": "1s", "command": ["true"]}}) as group:
        unknown = cli("pause", group.config, "tock")
        past = cli("pause", group.config, "tick", "--until", "2020-01-01T00:00:00Z")

    assert unknown.returncode == 78 and "unknown job 'tock'" in unknown.stderr
    assert past.returncode == 2 and "not in the future" in past.stderr
    assert "Traceback" not in unknown.stderr + past.stderr


def test_a_manual_trigger_runs_a_paused_job_and_says_so(tmp_path: Path, backend_url: str) -> None:
    out = tmp_path / "runs.log"
    jobs = {"tick": {"at": "2099-01-01T00:00:00Z", "command": span_command(out, 0)}}
    with fleet(tmp_path, backend_url, jobs) as group:
        paused = cli("pause", group.config, "tick", "--until", "1h")
        triggered = cli("trigger", group.config, "tick")

    assert paused.returncode == 0, paused.stderr
    assert triggered.returncode == 0, triggered.stderr
    assert "note: tick paused by" in triggered.stderr and "running it anyway" in triggered.stderr
    assert len(spans(out)) == 1


def test_check_warns_about_a_paused_job(tmp_path: Path, backend_url: str) -> None:
    with fleet(tmp_path, backend_url, {"tick": {"every": "1s", "command": ["true"]}}) as group:
        cli("pause", group.config, "tick", "--note", "disk full")
        checked = cli("check", group.config)

    assert checked.returncode == 0, checked.stderr
    assert "warning: tick paused by" in checked.stderr and "disk full" in checked.stderr


# --- catch-up --------------------------------------------------------------------------------


def test_catch_up_runs_what_each_policy_asks_for_once_after_the_fleet_was_down(
    tmp_path: Path, backend_url: str
) -> None:
    outs = {policy: tmp_path / f"{policy}.log" for policy in ("none", "latest", "all")}
    jobs = {
        f"c_{policy}": {
            "every": "2s",
            "catchup": policy,
            "catchup_window": "1m",
            "command": span_command(out, 0),
        }
        for policy, out in outs.items()
    }
    with fleet(tmp_path, backend_url, jobs) as group:
        group.start("r1")
        wait_for("a run of each", lambda: all(spans(out) for out in outs.values()), timeout=20)
        first = group.replicas.pop("r1").process
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=20)
        stopped = datetime.now(UTC)
        time.sleep(10.5)  # five firings of every job, with nobody up
        group.start("r2")
        group.start("r3")  # two replicas up at once
        wait_for("both started", lambda: len(schedule_from(group)) == 2, timeout=20)
        since = min(schedule_from(group).values())
        missed = fires_between(every_schedule(2), stopped + timedelta(seconds=1), since, 100)
        wait_for(
            "the catch-up of c_all",
            lambda: all(group.ledger.attempts(run_id("c_all", when)) for when in missed),
            timeout=30,
        )
        time.sleep(1)

    assert len(missed) >= 4

    def ran(policy: str) -> list[datetime]:
        found = spans(outs[policy])
        assert started_once_each(found)
        return [when for when in missed if run_id(f"c_{policy}", when) in {s.run_id for s in found}]

    assert ran("none") == []
    assert ran("latest") == missed[-1:]
    assert ran("all") == missed


# --- backfill --------------------------------------------------------------------------------


def backfill(config: Path, start: datetime, end: datetime, *extra: str) -> list[object]:
    """The arguments of ``singleton backfill`` for the job ``report`` from ``start`` to ``end``."""
    return ["backfill", config, "report", "--from", iso_z(start), "--to", iso_z(end), *extra]


def backfill_range() -> tuple[datetime, datetime]:
    """Six firings of an ``every: 10s`` job, a few minutes ago."""
    start = every_schedule(10).next_after(datetime.now(UTC) - timedelta(minutes=5))
    assert start is not None
    return start, start + timedelta(seconds=50)


def test_backfill_runs_exactly_the_firings_not_yet_succeeded(
    tmp_path: Path, backend_url: str
) -> None:
    out = tmp_path / "runs.log"
    start, end = backfill_range()
    jobs = {"report": {"every": "10s", "command": span_command(out, 0)}}
    with fleet(tmp_path, backend_url, jobs) as group:
        first = cli(*backfill(group.config, start, start + timedelta(seconds=20)))
        dry = cli(*backfill(group.config, start, end, "--dry-run"))
        full = cli(*backfill(group.config, start, end))
        rows = group.history("report")

    assert first.returncode == 0, first.stderr
    assert "3 of 3 firings run: 3 succeeded" in first.stdout
    assert "3 of 6 firings would run" in dry.stdout
    assert full.returncode == 0, full.stderr
    assert "3 of 3 firings run: 3 succeeded" in full.stdout
    expected = [run_id("report", start + timedelta(seconds=10 * i)) for i in range(6)]
    assert [span.run_id for span in spans(out)] == expected, "each once, oldest first"
    assert sorted(a.run_id for a in rows if a.state == "succeeded") == sorted(expected)


def test_an_interrupted_backfill_finishes_the_rest_when_run_again(
    tmp_path: Path, backend_url: str
) -> None:
    out = tmp_path / "runs.log"
    start, end = backfill_range()
    jobs = {"report": {"every": "10s", "command": span_command(out, 1)}}
    with fleet(tmp_path, backend_url, jobs, kill_grace="200ms") as group:
        args = backfill(group.config, start, end)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        interrupted = subprocess.Popen(
            [sys.executable, "-m", "singleton", *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        wait_for("the second firing to start", lambda: len(spans(out)) >= 2, timeout=30)
        interrupted.send_signal(signal.SIGINT)
        stdout, _ = interrupted.communicate(timeout=30)
        again = cli(*args)
        rows = group.history("report")

    assert interrupted.returncode == 1
    assert "left: run the same command again to finish" in stdout
    assert again.returncode == 0, again.stderr
    succeeded = {a.run_id for a in rows if a.state == "succeeded"}
    assert succeeded == {run_id("report", start + timedelta(seconds=10 * i)) for i in range(6)}
    again_ran = spans(out)[1].run_id
    assert [a.state for a in rows if a.run_id == again_ran] == ["succeeded", "interrupted"]
    assert [s.run_id for s in spans(out)].count(again_ran) == 2, "the interrupted firing ran again"
    assert len(spans(out)) == 7


def test_backfill_refuses_a_range_older_than_the_retention_and_the_future(
    tmp_path: Path, backend_url: str
) -> None:
    jobs = {"report": {"every": "10s", "command": ["true"]}}
    now = datetime.now(UTC)
    with fleet(
        tmp_path, backend_url, jobs, backend={"url": backend_url, "ledger_retention": "1h"}
    ) as group:
        old = cli(*backfill(group.config, now - timedelta(hours=2), now - timedelta(hours=1.98)))
        future = cli(*backfill(group.config, now, now + timedelta(hours=1)))
        assert group.history("report") == []

    assert old.returncode == 78 and "older than backend.ledger_retention" in old.stderr
    assert future.returncode == 2 and "in the future" in future.stderr


# --- overlap: one fleet, a job per policy, each longer than its interval -------------------


@pytest.fixture(scope="module")
def shared_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The backend of the one overlap fleet that the policy tests below all read."""
    return f"sqlite:///{tmp_path_factory.mktemp('overlap') / 'state.db'}"


@pytest.fixture(scope="module")
def overlapping(
    tmp_path_factory: pytest.TempPathFactory, shared_url: str
) -> Iterator[tuple[Fleet, dict[str, Path]]]:
    """Two replicas for about 13 s; every job fires every 2 s and takes 5 s."""
    tmp_path = tmp_path_factory.mktemp("fleet")
    policies = ("skip", "buffer_one", "buffer_all", "cancel_other", "allow")
    outs = {policy: tmp_path / f"{policy}.log" for policy in policies}
    jobs = {
        policy: {
            "every": "2s",
            "overlap": policy,
            "mode": "efficiency" if policy == "allow" else "singleton",
            "command": span_command(out, 5),
        }
        for policy, out in outs.items()
    }
    with fleet(tmp_path, shared_url, jobs, shutdown_grace="10s", kill_grace="1s") as group:
        group.start_many(2)
        time.sleep(13)
        for replica in group.replicas.values():
            replica.process.send_signal(signal.SIGTERM)
        for replica in group.replicas.values():
            replica.process.wait(timeout=30)
        yield group, outs


def test_skip_records_the_firings_that_came_while_one_ran(
    overlapping: tuple[Fleet, dict[str, Path]],
) -> None:
    group, outs = overlapping
    found = spans(outs["skip"])
    assert len(found) >= 2 and never_overlap(found) and started_once_each(found)
    skipped = [a for a in group.history("skip") if a.state == "skipped"]
    assert skipped and {a.reason for a in skipped} == {"overlap"}


def test_buffer_one_runs_one_waiting_firing_right_after_and_skips_the_others(
    overlapping: tuple[Fleet, dict[str, Path]],
) -> None:
    group, outs = overlapping
    found = spans(outs["buffer_one"])
    assert len(found) >= 2 and never_overlap(found) and started_once_each(found)
    assert found[1].start - found[0].end < 1.5, "the buffered firing started right after"
    skipped = [a for a in group.history("buffer_one") if a.state == "skipped"]
    assert skipped and {a.reason for a in skipped} == {"overlap"}


def test_buffer_all_runs_every_firing_in_turn(overlapping: tuple[Fleet, dict[str, Path]]) -> None:
    group, outs = overlapping
    found = spans(outs["buffer_all"])
    assert len(found) >= 2 and never_overlap(found) and started_once_each(found)
    assert [s.run_id for s in found] == sorted(s.run_id for s in found), "in schedule order"
    assert not [a for a in group.history("buffer_all") if a.state == "skipped"]


def test_cancel_other_stops_each_run_when_the_next_firing_comes(
    overlapping: tuple[Fleet, dict[str, Path]],
) -> None:
    group, outs = overlapping
    found = spans(outs["cancel_other"])
    assert len(found) >= 4 and started_once_each(found)
    rows = {a.run_id: a for a in group.history("cancel_other")}
    cancelled = [rows[s.run_id] for s in found[:-1]]
    assert {(a.state, a.reason) for a in cancelled} == {("interrupted", "overlap")}
    assert all(s.end is None for s in found[:-1]), "a cancelled run never reached its end"
    for old, new in itertools.pairwise(found):
        ended = rows[old.run_id].finished_at
        assert ended is not None and ended.timestamp() <= new.start + 0.05, "stopped, then next"


def test_allow_runs_firings_side_by_side_each_once(
    overlapping: tuple[Fleet, dict[str, Path]],
) -> None:
    group, outs = overlapping
    found = spans(outs["allow"])
    assert len(found) >= 4 and started_once_each(found)
    assert not never_overlap(found), "runs overlapped"
    assert len({s.token for s in found}) == len(found)
    assert all(a.state != "skipped" for a in group.history("allow"))


# --- timeout ---------------------------------------------------------------------------------


def test_a_command_that_ignores_sigterm_is_killed_at_its_timeout_and_the_lease_released(
    tmp_path: Path, backend_url: str
) -> None:
    out = tmp_path / "runs.log"
    jobs = {
        "stuck": {
            "every": "3s",
            "timeout": "1s",
            "lock_ttl": "30s",
            "command": span_command(out, 60, ignore_term=True),
        }
    }
    with fleet(tmp_path, backend_url, jobs, kill_grace="500ms") as group:
        replica = group.start("r1")
        wait_for("two runs", lambda: len(spans(out)) >= 2, timeout=30)
        first = group.history("stuck")[-1]
        leftover = processes_of(first.run_id)
        assert replica.process.poll() is None

    assert (first.state, first.error) == ("timed_out", "killed by SIGKILL")
    assert first.finished_at is not None and first.started_at is not None
    took = (first.finished_at - first.started_at).total_seconds()
    assert 1.4 <= took < 10, "the timeout, then kill_grace, then SIGKILL"
    second = spans(out)[1]
    assert second.start - spans(out)[0].start < 5, "the next firing was not held up by the lease"
    assert leftover == [], "the timed-out run left no process behind"


def processes_of(rid: str) -> list[int]:
    """Live processes started for the firing ``rid`` (by the environment they carry)."""
    marker = f"SINGLETON_RUN_ID={rid}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found
