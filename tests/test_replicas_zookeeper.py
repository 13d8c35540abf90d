"""The multi-process scenarios of :mod:`tests.test_replicas`, on ZooKeeper.

Three real ``singleton run`` processes share one standalone server. Each replica's session
times out in 2 s (set through the environment, as an operator could): a replica that is
killed or stopped keeps its locks until the servers expire its session, so the session
timeout, not only ``lock_ttl``, bounds how soon a standby takes over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.test_replicas import (  # noqa: F401 (collected here, on this module's backend_url)
    test_a_replica_one_second_ahead_changes_nothing,
    test_a_second_signal_exits_at_once,
    test_every_firing_runs_exactly_once_across_three_replicas,
    test_sigkill_of_the_owner_mid_run_is_taken_over_within_the_ttl,
    test_sigstopped_owner_resumes_to_a_refused_write,
    test_sigterm_of_the_owner_hands_over_well_under_the_ttl,
)
from tests.test_replicas_redis import (  # noqa: F401 (needs a coordinator with a clock)
    test_a_replica_whose_clock_runs_ahead_starts_no_firing_before_its_instant,
)

if TYPE_CHECKING:
    from tests.servers.zookeeper import ZookeeperServer

pytest_plugins = ["tests.servers.zookeeper"]
pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture
def backend_url(zookeeper: ZookeeperServer, monkeypatch: pytest.MonkeyPatch) -> str:
    # The scenarios' lock_ttl is 2 s: a session timeout no longer than that lets a standby
    # take over from a dead owner within the scenarios' bounds.
    monkeypatch.setenv("SINGLETON_BACKEND__SESSION_TIMEOUT", "2s")
    return zookeeper.url()
