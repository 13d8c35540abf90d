"""The backend contract over ``redis://``, on a real ``redis-server`` run with
``appendonly yes`` and ``appendfsync always`` (so the backend declares ``fencing``). Every
connection is a separate client, as separate replica processes would have."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from singleton.backends.redis import RedisBackend
from singleton.testing.contract import BackendContract, BackendFactory
from tests.servers.redis import RedisServer, redis_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis"), aof=True) as running:
        yield running


class TestRedisBackend(BackendContract):
    @pytest.fixture
    def backend_factory(self, server: RedisServer) -> BackendFactory:
        return lambda: RedisBackend(server.url)

    def test_fencing_is_declared(self, backend: RedisBackend) -> None:
        assert backend.capabilities.fencing
        assert backend.capabilities.shared and backend.capabilities.notify
