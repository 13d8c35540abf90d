"""The Redis fencing guard, on a real ``redis-server`` and real competing processes."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from singleton.backends.base import new_owner
from singleton.backends.redis import RedisBackend
from singleton.errors import AlreadyApplied, StaleToken
from singleton.fencing.redis import RedisFence, fence
from tests.servers.redis import RedisServer, redis_server

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent

RACER = """
import sys, redis
from singleton.errors import StaleToken
from singleton.fencing.redis import RedisFence

guard = RedisFence(redis.Redis.from_url(sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()
for token in map(int, sys.argv[2].split(",")):
    try:
        guard.apply("r", token, None, ("RPUSH", "{r}:log", token))
    except StaleToken:
        pass
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis"), aof=False) as running:
        yield running


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    server.admin.flushall()
    connection = redis.Redis.from_url(server.url, decode_responses=True)
    yield connection
    connection.close()


def test_a_write_is_applied_with_its_token(client: redis.Redis) -> None:
    guard = RedisFence(client)
    replies = guard.apply("orders", 5, "job@1", ("SET", "{orders}:total", "10"))
    assert replies == ["OK"]
    assert client.get("{orders}:total") == "10"
    assert guard.highest("orders") == 5
    assert guard.applied("orders", "job@1") == 5


def test_an_old_token_is_refused_and_nothing_is_written(client: redis.Redis) -> None:
    guard = RedisFence(client)
    guard.apply("orders", 7, None, ("SET", "{orders}:total", "new"))
    with pytest.raises(StaleToken, match="token 6 is lower than 7"):
        guard.apply("orders", 6, "job@2", ("SET", "{orders}:total", "stale"))
    assert client.get("{orders}:total") == "new"
    assert guard.highest("orders") == 7
    assert guard.applied("orders", "job@2") is None


def test_an_equal_token_may_write_again(client: redis.Redis) -> None:
    guard = RedisFence(client)
    guard.apply("orders", 3, None, ("INCRBY", "{orders}:n", 1))
    assert guard.apply("orders", 3, None, ("INCRBY", "{orders}:n", 1)) == [2]


def test_a_repeated_run_is_refused_even_under_a_newer_token(client: redis.Redis) -> None:
    guard = RedisFence(client)
    guard.apply("orders", 3, "compact@2026-12-01T01:30:00Z", ("INCRBY", "{orders}:n", 1))
    with pytest.raises(AlreadyApplied, match="already applied under token 3"):
        guard.apply("orders", 4, "compact@2026-12-01T01:30:00Z", ("INCRBY", "{orders}:n", 1))
    assert client.get("{orders}:n") == "1"
    assert guard.highest("orders") == 3, "a refused run does not move the token"


def test_several_writes_in_one_step_and_the_shortcut(client: redis.Redis) -> None:
    replies = fence(
        client,
        "shard-1",
        9,
        "owner@x",
        ("HSET", "{shard-1}:rows", "a", "1"),
        ("RPUSH", "{shard-1}:log", "x", "y"),
        ("GET", "{shard-1}:missing"),
    )
    assert replies == [1, 2, None]
    assert RedisFence(client).applied("shard-1", "owner@x") == 9


def test_works_with_a_client_that_does_not_decode(server: RedisServer) -> None:
    raw = redis.Redis.from_url(server.url)
    try:
        guard = RedisFence(raw)
        guard.apply("raw", 2, "r@1", ("SET", "{raw}:k", "v"))
        with pytest.raises(StaleToken):
            guard.apply("raw", 1, None)
        assert guard.highest("raw") == 2 and guard.applied("raw", "r@1") == 2
    finally:
        raw.close()


def test_a_failed_write_records_neither_token_nor_run(client: redis.Redis) -> None:
    guard = RedisFence(client)
    client.set("{orders}:a-string", "x")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        guard.apply("orders", 4, "job@9", ("HSET", "{orders}:a-string", "f", "v"))
    assert guard.highest("orders") is None and guard.applied("orders", "job@9") is None


def test_keep_runs_bounds_the_record(client: redis.Redis) -> None:
    guard = RedisFence(client, keep_runs=3)
    for token in range(1, 7):
        guard.apply("orders", token, f"job@{token}")
    kept = client.zrange(guard.keys("orders")[1], 0, -1)
    assert kept == ["job@4", "job@5", "job@6"]


def test_the_script_is_reloaded_after_a_flush(client: redis.Redis, server: RedisServer) -> None:
    guard = RedisFence(client)
    guard.apply("orders", 1)
    server.admin.script_flush()
    guard.apply("orders", 2)
    assert guard.highest("orders") == 2


def test_a_bad_write_is_refused_before_it_reaches_redis(client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="a command and a key"):
        RedisFence(client).apply("orders", 1, None, ("PING",))


def test_racing_processes_never_apply_a_lower_token_after_a_higher_one(
    server: RedisServer, client: redis.Redis
) -> None:
    tokens = list(range(1, 201))
    random.Random(7).shuffle(tokens)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, server.url, ",".join(map(str, tokens[i::4]))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        for i in range(4)
    ]
    for racer in racers:
        assert racer.stdout is not None and racer.stdout.readline() == "ready\n"
    for racer in racers:
        assert racer.stdin is not None
        racer.stdin.write("go\n")
        racer.stdin.close()
    for racer in racers:
        assert racer.wait(timeout=60) == 0
        assert racer.stdout is not None
        racer.stdout.close()
    log = [int(value) for value in client.lrange("{r}:log", 0, -1)]
    assert log, "no write was applied"
    assert log == sorted(log), "a stale write was applied after a newer one"
    assert log[-1] == RedisFence(client).highest("r")


def test_a_server_clock_jump_lets_a_second_owner_in_and_the_fence_refuses_the_first(
    server: RedisServer, client: redis.Redis
) -> None:
    """A jump of the Redis server's clock expires the lock early (TESTING.md T3): a second
    owner gets it while the first still believes it holds. The token counter does not
    expire, so the second token is higher, and the first owner's late write is refused."""
    backend = RedisBackend(server.url)
    try:
        first = backend.try_acquire("orders", 30.0, new_owner("first"))
        assert first is not None
        server.jump_clock(60)
        second = backend.try_acquire("orders", 30.0, new_owner("second"))
        assert second is not None and second.token > first.token
        guard = RedisFence(client)
        guard.apply("orders", second.token, None, ("SET", "{orders}:total", "second"))
        with pytest.raises(StaleToken):
            guard.apply("orders", first.token, None, ("SET", "{orders}:total", "first"))
        assert client.get("{orders}:total") == "second"
    finally:
        backend.close()
