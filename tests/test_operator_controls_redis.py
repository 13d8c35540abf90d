"""The operator-control scenarios of :mod:`tests.test_operator_controls` on a real Redis
server (``appendonly yes``, ``appendfsync always``): the pause switch in Redis shared state,
catch-up, backfill, the overlap policies and timeouts, with real replica processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.redis import RedisServer
from tests.test_operator_controls import (
    overlapping,
    test_a_command_that_ignores_sigterm_is_killed_at_its_timeout_and_the_lease_released,
    test_a_pause_from_the_cli_stops_every_replica_until_resume,
    test_allow_runs_firings_side_by_side_each_once,
    test_an_interrupted_backfill_finishes_the_rest_when_run_again,
    test_backfill_runs_exactly_the_firings_not_yet_succeeded,
    test_buffer_all_runs_every_firing_in_turn,
    test_buffer_one_runs_one_waiting_firing_right_after_and_skips_the_others,
    test_cancel_other_stops_each_run_when_the_next_firing_comes,
    test_catch_up_runs_what_each_policy_asks_for_once_after_the_fleet_was_down,
    test_skip_records_the_firings_that_came_while_one_ran,
)

pytestmark = [pytest.mark.slow, pytest.mark.server]

__all__ = [
    "overlapping",
    "test_a_command_that_ignores_sigterm_is_killed_at_its_timeout_and_the_lease_released",
    "test_a_pause_from_the_cli_stops_every_replica_until_resume",
    "test_allow_runs_firings_side_by_side_each_once",
    "test_an_interrupted_backfill_finishes_the_rest_when_run_again",
    "test_backfill_runs_exactly_the_firings_not_yet_succeeded",
    "test_buffer_all_runs_every_firing_in_turn",
    "test_buffer_one_runs_one_waiting_firing_right_after_and_skips_the_others",
    "test_cancel_other_stops_each_run_when_the_next_firing_comes",
    "test_catch_up_runs_what_each_policy_asks_for_once_after_the_fleet_was_down",
    "test_skip_records_the_firings_that_came_while_one_ran",
]


@pytest.fixture
def backend_url(tmp_path: Path) -> Iterator[str]:
    server = RedisServer(tmp_path / "redis", aof=True).start()
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def shared_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), aof=True).start()
    yield server.url
    server.stop()
