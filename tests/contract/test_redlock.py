"""The backend contract over ``redlock://``, on three real ``redis-server`` processes
without persistence (Redlock declares no fencing whatever the nodes' persistence). Every
connection is a separate backend, with its own clients to every node, as separate replica
processes would have."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from singleton.backends.redlock import RedlockBackend
from singleton.testing.contract import BackendContract, BackendFactory
from tests.servers.redis import RedisServer, redis_servers, redlock_url

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    with redis_servers(tmp_path_factory.mktemp("redlock"), 3) as running:
        yield running


class TestRedlockBackend(BackendContract):
    @pytest.fixture
    def backend_factory(self, servers: list[RedisServer]) -> BackendFactory:
        url = redlock_url(servers)
        return lambda: RedlockBackend(url)
