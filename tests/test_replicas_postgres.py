"""The multi-process scenarios of tests/test_replicas.py on PostgreSQL: three real
``singleton run`` processes, each firing written through a fenced sink. Each scenario gets a
database of its own on the session's server. Beyond those, the database restarts under a
running fleet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import test_replicas as scenarios
from tests.replicas import fleet, sink_command, wait_for
from tests.servers.postgres import PostgresServer, fresh_server, shared_server
from tests.test_replicas import applied_by_run, sink_writes

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with shared_server() as server:
        yield server


@pytest.fixture
def backend_url(postgres: PostgresServer) -> str:
    return postgres.create_database()


test_every_firing_runs_exactly_once_across_three_replicas = (
    scenarios.test_every_firing_runs_exactly_once_across_three_replicas
)
test_sigkill_of_the_owner_mid_run_is_taken_over_within_the_ttl = (
    scenarios.test_sigkill_of_the_owner_mid_run_is_taken_over_within_the_ttl
)
test_sigstopped_owner_resumes_to_a_refused_write = (
    scenarios.test_sigstopped_owner_resumes_to_a_refused_write
)
test_sigterm_of_the_owner_hands_over_well_under_the_ttl = (
    scenarios.test_sigterm_of_the_owner_hands_over_well_under_the_ttl
)
test_a_replica_one_second_ahead_changes_nothing = (
    scenarios.test_a_replica_one_second_ahead_changes_nothing
)
test_a_second_signal_exits_at_once = scenarios.test_a_second_signal_exits_at_once


def test_a_database_restart_under_a_running_fleet_applies_no_firing_twice(
    tmp_path: Path,
) -> None:
    sink = tmp_path / "sink.db"
    job: dict[str, object] = {"every": "1s", "command": sink_command(sink), "lock_ttl": "3s"}
    with (
        fresh_server() as server,
        fleet(tmp_path, server.create_database(), {"tick": job}) as group,
    ):
        group.start_many(3)
        wait_for("5 firings", lambda: len(applied_by_run(sink)) >= 5, timeout=30, every=0.2)
        server.stop()

        def noticed() -> bool:
            logs = [r.log.read_text() for r in group.replicas.values()]
            return any('"backend_error"' in log or "firing failed" in log for log in logs)

        wait_for("a replica to find the database gone", noticed, timeout=10, every=0.1)
        server.start()
        before = len(applied_by_run(sink))
        wait_for(
            "5 firings after the restart",
            lambda: len(applied_by_run(sink)) >= before + 5,
            timeout=30,
            every=0.2,
        )
        history = group.history("tick")
    applied = applied_by_run(sink)
    assert all(len(tokens) == 1 for tokens in applied.values()), applied
    # The one way a firing may run twice: the database went away after the job's write and
    # before its owner recorded the outcome. The owner's attempt is then taken over as an
    # orphan, and the resource's guard refuses the second write.
    for row in sink_writes(sink):
        if not row["applied"]:
            assert row["reason"] == "AlreadyApplied", dict(row)
            states = [a.state for a in history if a.run_id == row["run_id"]]
            assert "abandoned" in states, f"{row['run_id']} ran twice: {states}"
