"""The backend contract over ``etcd://``, on a real single-node etcd: every connection is a
separate HTTP client, as separate replica processes would have."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pytest

from singleton.backends.base import Lease
from singleton.backends.etcd import EtcdBackend
from singleton.testing.contract import BackendContract, BackendFactory, SharedStateContract
from tests.servers.etcd import EtcdCluster, etcd_cluster

pytestmark = pytest.mark.server

#: etcd revokes expired leases in a sweep that runs every 500 ms (its lessor's run loop), so
#: an expired lease's key can outlive the TTL by up to that much.
EXPIRY_SWEEP = 0.5


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


class TestEtcdBackend(BackendContract, SharedStateContract):
    #: etcd grants whole seconds, 2 s at least.
    short_ttl = 2.0

    def wait_out(self, lease: Lease) -> None:
        """Past the TTL etcd granted (whole seconds) and its next expiry sweep."""
        time.sleep(math.ceil(lease.ttl) + EXPIRY_SWEEP + 0.1)

    @pytest.fixture
    def backend_factory(self, etcd: EtcdCluster) -> BackendFactory:
        url = etcd.url("/contract")
        return lambda: EtcdBackend(url)
