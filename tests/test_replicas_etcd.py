"""The multi-process scenarios of ``tests/test_replicas.py``, on a real etcd: three
``singleton run`` processes, SIGKILL, SIGSTOP, SIGTERM and a skewed clock, with every job's
write going through the fenced SQLite sink. Each test gets a prefix of its own."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.servers.etcd import EtcdCluster, etcd_cluster
from tests.test_replicas import (
    test_a_replica_one_second_ahead_changes_nothing,
    test_a_second_signal_exits_at_once,
    test_every_firing_runs_exactly_once_across_three_replicas,
    test_sigkill_of_the_owner_mid_run_is_taken_over_within_the_ttl,
    test_sigstopped_owner_resumes_to_a_refused_write,
    test_sigterm_of_the_owner_hands_over_well_under_the_ttl,
)

__all__ = [
    "test_a_replica_one_second_ahead_changes_nothing",
    "test_a_second_signal_exits_at_once",
    "test_every_firing_runs_exactly_once_across_three_replicas",
    "test_sigkill_of_the_owner_mid_run_is_taken_over_within_the_ttl",
    "test_sigstopped_owner_resumes_to_a_refused_write",
    "test_sigterm_of_the_owner_hands_over_well_under_the_ttl",
]

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def backend_url(etcd: EtcdCluster) -> str:
    return etcd.url(f"/replicas-{uuid.uuid4().hex[:8]}")
