"""The backend contract over ``redlock://``, on three real ``redis-server`` processes
without persistence (Redlock declares no fencing whatever the nodes' persistence). Every
connection is a separate backend, with its own clients to every node, as separate replica
processes would have."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest

from singleton.backends import redlock
from singleton.backends.redis import KeySpace
from singleton.backends.redlock import RedlockBackend
from singleton.clock import SystemClock
from singleton.errors import BackendUnavailable
from singleton.testing.contract import BackendContract, BackendFactory, SharedStateContract
from tests.servers.redis import RedisServer, redis_servers, redlock_url

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    with redis_servers(tmp_path_factory.mktemp("redlock"), 3) as running:
        yield running


class TestRedlockBackend(BackendContract, SharedStateContract):
    @pytest.fixture
    def backend_factory(self, servers: list[RedisServer]) -> BackendFactory:
        url = redlock_url(servers)
        return lambda: RedlockBackend(url)


class Behind(SystemClock):
    """A writer whose wall clock is a minute behind."""

    def now(self) -> datetime:
        return super().now() - timedelta(minutes=1)


class TestRedlockSharedState:
    """Shared state on the quorum, beyond the contract: on three nodes of each test's own,
    with AOF, so that a stopped node comes back with what it held (as a partitioned one
    would)."""

    @pytest.fixture
    def nodes(self, tmp_path: Path) -> Iterator[list[RedisServer]]:
        with redis_servers(tmp_path, 3, aof=True) as servers:
            yield servers

    @pytest.fixture
    def backend(
        self, nodes: list[RedisServer], monkeypatch: pytest.MonkeyPatch
    ) -> Iterator[RedlockBackend]:
        monkeypatch.setattr(redlock, "DROP_AFTER", 0.2)  # not a minute: dropped in a test
        opened = RedlockBackend(redlock_url(nodes), timeout="200ms")
        yield opened
        opened.close()

    @staticmethod
    def held(node: RedisServer) -> dict[str, str]:
        """What one node stores, raw: key → '<version>:<deadline>:<value>'."""
        return cast(dict[str, str], node.admin.hgetall(KeySpace().state.values))

    def test_one_node_down_works_and_two_are_unavailable(
        self, backend: RedlockBackend, nodes: list[RedisServer]
    ) -> None:
        nodes[2].stop()
        backend.put("fleet/r1", "a", ttl=60)
        backend.put("paused/job", "1")
        backend.delete("paused/job")
        assert backend.scan("") == {"fleet/r1": "a"}
        nodes[1].stop()
        with pytest.raises(BackendUnavailable):
            backend.put("fleet/r1", "b")
        with pytest.raises(BackendUnavailable):
            backend.scan("fleet/")

    def test_a_delete_is_not_undone_by_a_node_that_missed_it(
        self, backend: RedlockBackend, nodes: list[RedisServer]
    ) -> None:
        a, _, c = nodes
        backend.put("paused/job", "1")
        c.stop()
        backend.delete("paused/job")
        c.start()  # back with its live copy
        a.stop()
        assert backend.scan("paused/") == {}  # b's newer dead entry outvotes c's copy
        assert self.held(c)["paused/job"].endswith(":")  # and the read copied it to c
        a.start()
        assert backend.scan("paused/") == {}
        assert all(self.held(node) for node in nodes)  # dead, but not for long enough
        time.sleep(0.3)
        assert backend.scan("paused/") == {}
        assert [self.held(node) for node in nodes] == [{}, {}, {}]  # all answered: dropped

    def test_dead_entries_stay_while_a_node_is_down_and_go_once_every_node_answers(
        self, backend: RedlockBackend, nodes: list[RedisServer]
    ) -> None:
        nodes[2].stop()
        backend.put("fleet/gone", "x", ttl=0.2)
        backend.put("fleet/left", "y")
        backend.delete("fleet/left")
        time.sleep(0.5)
        assert backend.scan("fleet/") == {}
        assert set(self.held(nodes[0])) == {"fleet/gone", "fleet/left"}
        nodes[2].start()
        assert backend.scan("fleet/") == {}
        assert [self.held(node) for node in nodes] == [{}, {}, {}]

    def test_prune_drops_dead_entries_under_any_prefix(
        self, backend: RedlockBackend, nodes: list[RedisServer]
    ) -> None:
        backend.put("unread/1", "x", ttl=0.1)
        time.sleep(0.4)
        backend.prune(datetime(2020, 1, 1, tzinfo=UTC), keep=10)
        assert [self.held(node) for node in nodes] == [{}, {}, {}]

    def test_a_read_copies_a_write_to_a_node_that_missed_it(
        self, backend: RedlockBackend, nodes: list[RedisServer]
    ) -> None:
        a, b, c = nodes
        c.stop()
        backend.put("paused/job", "1")
        c.start()
        assert backend.scan("paused/") == {"paused/job": "1"}
        assert set(self.held(c)) == {"paused/job"}
        a.call("FLUSHALL")  # a loses its data, b goes down: c's copy is what is left
        b.stop()
        assert backend.scan("paused/") == {"paused/job": "1"}

    def test_the_newest_write_wins_whatever_the_nodes_hold(
        self, backend: RedlockBackend, nodes: list[RedisServer]
    ) -> None:
        backend.put("paused/job", "old")
        nodes[2].stop()
        backend.put("paused/job", "new")
        nodes[2].start()
        nodes[0].stop()
        assert backend.scan("paused/") == {"paused/job": "new"}  # b's over c's

    def test_a_write_by_an_earlier_clock_loses(
        self, backend: RedlockBackend, nodes: list[RedisServer]
    ) -> None:
        late = RedlockBackend(redlock_url(nodes), clock=Behind())
        try:
            backend.put("paused/job", "now")
            late.put("paused/job", "a minute ago")
            assert late.scan("paused/") == {"paused/job": "now"}
        finally:
            late.close()
