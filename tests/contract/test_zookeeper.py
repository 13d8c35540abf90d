"""The backend contract over ``zookeeper://``, on a standalone server and on a three-member
ensemble (where a read may come from a follower that lags the leader).

Every connection is its own ZooKeeper session, as separate replicas have. The contract's
``short_ttl`` leases expire while their holder's process runs: the holder's backend deletes
the lock node of a lease it did not renew in time (a dead holder's node would go with its
session instead, after the session timeout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from singleton.backends.zookeeper import ZookeeperBackend
from singleton.testing.contract import BackendContract, BackendFactory, SharedStateContract

if TYPE_CHECKING:
    from tests.servers.zookeeper import ZookeeperEnsemble, ZookeeperServer

pytest_plugins = ["tests.servers.zookeeper"]
pytestmark = pytest.mark.server

#: Longer than the contract's ``ttl``, so its leases keep the TTL they asked for.
SESSION_TIMEOUT = 8.0


class TestZookeeperStandalone(BackendContract, SharedStateContract):
    @pytest.fixture
    def backend_factory(self, zookeeper: ZookeeperServer) -> BackendFactory:
        url = zookeeper.url()
        return lambda: ZookeeperBackend(url, session_timeout=SESSION_TIMEOUT)


class TestZookeeperEnsemble(BackendContract, SharedStateContract):
    @pytest.fixture
    def backend_factory(self, zookeeper_ensemble: ZookeeperEnsemble) -> BackendFactory:
        url = zookeeper_ensemble.url()
        return lambda: ZookeeperBackend(url, session_timeout=SESSION_TIMEOUT)
