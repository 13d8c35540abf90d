"""The backend contract over ``redis://``, on a real ``redis-server`` run with
``appendonly yes`` and ``appendfsync always`` (so the backend declares ``fencing``). Every
connection is a separate client, as separate replica processes would have."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from redis.crc import key_slot

from singleton.backends.redis import RedisBackend
from singleton.testing.contract import BackendContract, BackendFactory, SharedStateContract
from tests.servers.redis import RedisServer, commands_between, redis_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis"), aof=True) as running:
        yield running


class TestRedisBackend(BackendContract, SharedStateContract):
    @pytest.fixture
    def backend_factory(self, server: RedisServer) -> BackendFactory:
        return lambda: RedisBackend(server.url)

    def test_fencing_is_declared(self, backend: RedisBackend) -> None:
        assert backend.capabilities.fencing
        assert backend.capabilities.shared and backend.capabilities.notify


class TestRedisSharedState:
    """Where the shared state lives and how it expires, beyond the contract."""

    @pytest.fixture
    def backend(self, server: RedisServer) -> Iterator[RedisBackend]:
        # A prefix of its own: these tests count and inspect the state keys.
        opened = RedisBackend(server.url, prefix=f"state-{uuid.uuid4().hex[:8]}")
        yield opened
        opened.close()

    def test_state_lives_under_the_prefix_in_one_slot(
        self, backend: RedisBackend, server: RedisServer
    ) -> None:
        backend.put("fleet/r1", "x", ttl=60)
        backend.put("paused/job", "1")
        root = f"singleton:{backend.keys.prefix}:{{@state}}:"
        assert sorted(server.admin.keys(root + "*")) == [
            root + "expires",
            root + "index",
            root + "values",
        ]
        assert server.admin.hgetall(root + "values") == {"fleet/r1": "x", "paused/job": "1"}
        assert server.admin.zrange(root + "expires", 0, -1) == ["fleet/r1"]
        assert len({key_slot(key.encode()) for key in backend.keys.state.all}) == 1

    def test_a_scan_reads_its_prefix_only(self, backend: RedisBackend, server: RedisServer) -> None:
        for i in range(50):
            backend.put(f"other/{i}", "x")
        backend.put("fleet/r1", "a")
        before = server.commandstats()
        assert backend.scan("fleet/") == {"fleet/r1": "a"}
        calls = commands_between(before, server.commandstats())
        assert calls.get("zrangebylex") == 1
        assert calls.get("hget") == 1  # one value read: the 50 other keys are never touched
        assert not {"keys", "scan", "hscan", "hgetall", "zrange"} & set(calls)

    def test_an_empty_prefix_finds_everything(self, backend: RedisBackend) -> None:
        backend.put("a/1", "x")
        backend.put("b/2", "y")
        assert backend.scan("") == {"a/1": "x", "b/2": "y"}

    def test_a_put_without_a_ttl_drops_an_earlier_deadline(self, backend: RedisBackend) -> None:
        backend.put("paused/job", "1", ttl=0.2)
        backend.put("paused/job", "1")
        time.sleep(0.4)
        assert backend.scan("paused/") == {"paused/job": "1"}

    def test_expired_entries_are_deleted_by_later_puts_and_by_prune(
        self, backend: RedisBackend, server: RedisServer
    ) -> None:
        values = backend.keys.state.values
        for i in range(25):
            backend.put(f"fleet/r{i}", "x", ttl=0.1)
        time.sleep(0.3)
        backend.put("fleet/live", "y")  # deletes a batch of the expired ones
        assert server.admin.hlen(values) == 25 + 1 - 10
        backend.prune(datetime(2020, 1, 1, tzinfo=UTC), keep=10)
        assert server.admin.hgetall(values) == {"fleet/live": "y"}
        assert server.admin.zcard(backend.keys.state.index) == 1
        assert server.admin.zcard(backend.keys.state.expires) == 0

    def test_prefixes_do_not_see_each_others_state(
        self, backend: RedisBackend, server: RedisServer
    ) -> None:
        backend.put("fleet/r1", "mine")
        other = RedisBackend(server.url, prefix=f"other-{uuid.uuid4().hex[:8]}")
        try:
            assert other.scan("fleet/") == {}
        finally:
            other.close()
