"""What the Redis backend promises beyond the shared contract, on real ``redis-server``
processes: honest capabilities, the key layout, one round trip per fused path, restarts
with and without AOF, a paused server, cut connections, standby wake-ups, retention, the
server clock and URL mistakes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from redis import exceptions as rex
from redis.crc import key_slot

from singleton.app import load
from singleton.backends import open_backend
from singleton.backends.base import RUNNING, SUCCEEDED, Lease, Outcome, new_owner
from singleton.backends.redis import KeySpace, RedisBackend, translated
from singleton.clock import SYSTEM_CLOCK
from singleton.errors import BackendError, BackendUnavailable, ConfigError, LeaseLost
from singleton.lease import LeaseKeeper
from singleton.testing.contract import make_run
from tests.replicas import FAKETIME
from tests.servers import free_port
from tests.servers.redis import RedisServer, commands_between, redis_server

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def durable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """``appendonly yes`` + ``appendfsync always``: the setup that earns ``fencing``."""
    with redis_server(tmp_path_factory.mktemp("aof"), aof=True) as server:
        yield server


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """No persistence at all."""
    with redis_server(tmp_path_factory.mktemp("plain"), aof=False) as server:
        yield server


@pytest.fixture
def backend(durable: RedisServer) -> Iterator[RedisBackend]:
    opened = RedisBackend(durable.url)
    yield opened
    opened.close()


@pytest.fixture
def name() -> str:
    return f"job-{uuid.uuid4().hex[:10]}"


def acquire(backend: RedisBackend, name: str, ttl: float = 5.0) -> Lease:
    lease = backend.try_acquire(name, ttl, new_owner("test"))
    assert lease is not None
    return lease


def write_config(path: Path, url: str, mode: str, **backend: object) -> Path:
    body = {
        "backend": {"url": url, **backend},
        "jobs": {"shard": {"every": "10s", "mode": mode, "command": ["true"]}},
    }
    path.write_text(yaml.safe_dump(body))
    return path


# -- capabilities ------------------------------------------------------------------------------


def test_aof_always_declares_fencing(backend: RedisBackend) -> None:
    caps = backend.capabilities
    assert (caps.fencing, caps.shared, caps.notify) == (True, True, True)


@pytest.mark.parametrize("fsync", ["everysec", "no"])
def test_aof_without_fsync_always_declares_no_fencing(tmp_path: Path, fsync: str) -> None:
    with redis_server(tmp_path, aof=True, extra=["--appendfsync", fsync]) as server:
        opened = RedisBackend(server.url)
        try:
            assert not opened.capabilities.fencing
        finally:
            opened.close()


def test_a_policy_that_may_evict_the_counter_declares_no_fencing(tmp_path: Path) -> None:
    with redis_server(tmp_path, aof=True, extra=["--maxmemory-policy", "allkeys-lru"]) as server:
        opened = RedisBackend(server.url)
        try:
            assert not opened.capabilities.fencing
        finally:
            opened.close()


def test_no_persistence_declares_no_fencing(plain: RedisServer) -> None:
    opened = RedisBackend(plain.url)
    try:
        assert not opened.capabilities.fencing
    finally:
        opened.close()


def test_an_ownership_job_is_refused_at_start_without_fencing(
    tmp_path: Path, plain: RedisServer, durable: RedisServer
) -> None:
    refused = load(write_config(tmp_path / "plain.yaml", plain.url, "ownership"))
    with pytest.raises(ConfigError, match="mode ownership needs a backend with fencing"):
        refused.open_backend()
    accepted = load(write_config(tmp_path / "aof.yaml", durable.url, "ownership"))
    accepted.open_backend().close()
    load(write_config(tmp_path / "single.yaml", plain.url, "singleton")).open_backend().close()


def test_check_refuses_ownership_on_a_redis_without_persistence_in_one_line(
    tmp_path: Path, plain: RedisServer
) -> None:
    config = write_config(tmp_path / "c.yaml", plain.url, "ownership")
    out = subprocess.run(
        [sys.executable, "-m", "singleton", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 78, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "fencing" in out.stderr


def test_durable_declares_fencing_where_config_is_disabled(tmp_path: Path) -> None:
    with redis_server(tmp_path, aof=False, extra=["--rename-command", "CONFIG", ""]) as server:
        undeclared = RedisBackend(server.url)
        declared = RedisBackend(server.url, durable="true")
        try:
            assert not undeclared.capabilities.fencing
            assert declared.capabilities.fencing
        finally:
            undeclared.close()
            declared.close()


def test_durable_true_contradicted_by_the_server_is_a_config_error(plain: RedisServer) -> None:
    with pytest.raises(ConfigError, match=r"durable: true, but .* does not run appendonly yes"):
        RedisBackend(plain.url, durable=True)


def test_durable_false_turns_fencing_off(durable: RedisServer) -> None:
    opened = open_backend(durable.url, durable=False)
    try:
        assert not opened.capabilities.fencing
    finally:
        opened.close()


def test_unknown_and_bad_options_are_config_errors(durable: RedisServer) -> None:
    with pytest.raises(ConfigError, match="allowed: durable, prefix, timeout"):
        open_backend(durable.url, bogus=1)
    with pytest.raises(ConfigError, match=r"backend\.prefix"):
        RedisBackend(durable.url, prefix="a b")
    with pytest.raises(ConfigError, match=r"backend\.timeout"):
        RedisBackend(durable.url, timeout="0s")
    with pytest.raises(ConfigError, match=r"backend\.durable"):
        RedisBackend(durable.url, durable="perhaps")
    RedisBackend(durable.url, timeout="250ms").close()


# -- keys --------------------------------------------------------------------------------------


def test_one_jobs_keys_share_a_slot_and_jobs_spread(backend: RedisBackend, name: str) -> None:
    run = make_run(name)
    got = backend.acquire_and_claim(run, 5.0, new_owner("a"))
    assert got is not None
    backend.finish_and_release(run, got[0], 1, Outcome(SUCCEEDED))
    found = list(backend.scripts.client.scan_iter(match=f"singleton:default:{{{name}}}:*"))
    assert len(found) >= 5, found  # token, runs, index, highest, one attempt
    assert len({key_slot(key.encode()) for key in found}) == 1
    slots = {key_slot(KeySpace().job(f"job-{i}").lock.encode()) for i in range(20)}
    assert len(slots) > 15, "different jobs should land on different slots"


def test_scripts_run_on_a_cluster_node(tmp_path: Path, name: str) -> None:
    """Redis Cluster refuses a script whose keys span slots (CROSSSLOT): on a one-node
    cluster serving every slot, every step must work, and ``CLUSTER KEYSLOT`` agrees."""
    # The cluster bus port defaults to the port + 10000, which a free port may exceed.
    cluster = ["--cluster-enabled", "yes", "--cluster-port", str(free_port())]
    with redis_server(tmp_path, aof=True, extra=cluster) as server:
        server.call("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while "cluster_state:ok" not in server.call("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster never came up"
            time.sleep(0.05)
        keys = KeySpace().job(name)
        slots = {
            server.call("CLUSTER", "KEYSLOT", key)
            for key in (keys.lock, keys.token, keys.runs, keys.index, keys.highest)
        }
        assert len(slots) == 1
        opened = RedisBackend(server.url)
        try:
            run = make_run(name)
            got = opened.acquire_and_claim(run, 5.0, new_owner("a"))
            assert got is not None
            lease, _ = got
            lease = opened.renew(lease)
            assert opened.holder(name) is not None
            assert opened.finish_and_release(run, lease, 1, Outcome(SUCCEEDED))
            assert opened.skip(make_run(name, datetime(2026, 1, 1, tzinfo=UTC)), "paused", "r")
            assert [a.state for a in opened.attempts(run.run_id)] == [SUCCEEDED]
            assert len(opened.history(None, 0)) == 2
            assert opened.prune(datetime(2026, 6, 1, tzinfo=UTC), keep=10) == 1
            assert opened.evict(name, 50) == 50
        finally:
            opened.close()


def test_prefixes_keep_applications_apart(durable: RedisServer, name: str) -> None:
    one = RedisBackend(durable.url, prefix="app-one")
    two = RedisBackend(durable.url, prefix="app-two")
    try:
        assert one.try_acquire(name, 5.0, new_owner("a")) is not None
        assert two.try_acquire(name, 5.0, new_owner("b")) is not None
    finally:
        one.close()
        two.close()


# -- round trips and scripts -------------------------------------------------------------------


def test_each_fused_path_is_one_round_trip(backend: RedisBackend, durable: RedisServer) -> None:
    job = f"job-{uuid.uuid4().hex[:10]}"
    warm = make_run(job, datetime(2026, 1, 1, tzinfo=UTC))
    got = backend.acquire_and_claim(warm, 5.0, new_owner("a"))  # registers the job once
    assert got is not None
    backend.finish_and_release(warm, got[0], 1, Outcome(SUCCEEDED))

    run = make_run(job)
    with durable.monitor() as acquiring:
        got = backend.acquire_and_claim(run, 5.0, new_owner("a"))
    assert got is not None and got[1].attempt is not None
    with durable.monitor() as finishing:
        assert backend.finish_and_release(run, got[0], 1, Outcome(SUCCEEDED))
    assert acquiring == ["evalsha"]
    assert finishing == ["evalsha"]
    with durable.monitor() as renewing:
        backend.renew(acquire(backend, job))
    assert renewing == ["evalsha", "evalsha"]


def test_scripts_are_loaded_once_and_reloaded_after_a_flush(
    durable: RedisServer, name: str
) -> None:
    before = durable.commandstats()
    opened = RedisBackend(durable.url)
    try:
        opened.release(acquire(opened, name))
        loaded = commands_between(before, durable.commandstats())
        assert loaded.get("script|load") == len(opened.scripts._scripts)
        durable.call("SCRIPT", "FLUSH")
        with durable.monitor() as reloading:
            opened.release(acquire(opened, name))
        # Each script used: EVALSHA refused with NOSCRIPT, loaded once, run again.
        assert reloading == ["evalsha", "script", "evalsha"] * 2
        with durable.monitor() as again:
            opened.release(acquire(opened, name))
        assert again == ["evalsha", "evalsha"]
    finally:
        opened.close()


# -- restarts ----------------------------------------------------------------------------------


def test_a_restart_with_aof_keeps_tokens_and_ledger(tmp_path: Path, name: str) -> None:
    server = RedisServer(tmp_path, aof=True).start()
    opened = RedisBackend(server.url)
    try:
        first = make_run(name, datetime(2026, 1, 1, tzinfo=UTC))
        got = opened.acquire_and_claim(first, 5.0, new_owner("a"))
        assert got is not None
        opened.finish_and_release(first, got[0], 1, Outcome(SUCCEEDED))
        held = acquire(opened, name + "-held", ttl=30.0)
        server.restart(signal.SIGKILL)  # no chance to flush anything but what fsync wrote
        second = make_run(name)
        again = opened.acquire_and_claim(second, 5.0, new_owner("b"))
        assert again is not None
        assert again[0].token > got[0].token
        assert again[1].highest == got[0].token
        assert [a.state for a in opened.attempts(first.run_id)] == [SUCCEEDED]
        holder = opened.holder(name + "-held")
        assert holder is not None and holder.owner == held.owner
        opened.renew(held)
    finally:
        opened.close()
        server.stop()


def test_a_restart_without_persistence_is_detected_and_repaired(tmp_path: Path, name: str) -> None:
    server = RedisServer(tmp_path, aof=False).start()
    opened = RedisBackend(server.url)
    try:
        for i in range(5):
            run = make_run(name, datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=i))
            got = opened.acquire_and_claim(run, 5.0, new_owner("a"))
            assert got is not None
            opened.finish_and_release(run, got[0], 1, Outcome(SUCCEEDED))
        last = got[0].token
        server.restart(signal.SIGKILL)
        run = make_run(name)
        got = opened.acquire_and_claim(run, 5.0, new_owner("a"))
        assert got is not None
        lease, claim = got
        assert lease.token == 1, "the counter came back empty"
        # The server forgot the ledger's highest token; this process did not.
        assert claim.highest == last
        assert opened.evict(name, claim.highest) == last
        assert acquire(opened, name).token == last + 1
    finally:
        opened.close()
        server.stop()


# -- faults --------------------------------------------------------------------------------------


def test_a_paused_server_loses_the_lease_locally_by_the_deadline(tmp_path: Path, name: str) -> None:
    server = RedisServer(tmp_path, aof=True).start()
    opened = RedisBackend(server.url)
    other = RedisBackend(server.url)
    lost = threading.Event()
    failures: list[str] = []
    try:
        lease = acquire(opened, name, ttl=1.5)
        keeper = LeaseKeeper(
            opened,
            lease,
            SYSTEM_CLOCK,
            on_lost=lambda _: lost.set(),
            on_renewal_failed=failures.append,
        ).start()
        time.sleep(0.2)
        server.pause()
        try:
            assert lost.wait(5.0), "the keeper never gave the lease up"
            late = time.monotonic() - lease.deadline
            # A renewal blocks at most one socket timeout (0.5 s) past the deadline.
            assert late < 0.5 + 0.3, f"lost {late:.2f}s after the deadline"
            assert failures and all("Timeout" in f or "Unavailable" in f for f in failures)
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                opened.renew(lease)
            assert time.monotonic() - started < 0.5 + 0.3
        finally:
            server.resume()
        keeper.stop()
        newer = acquire(other, name)
        assert newer.token > lease.token
        with pytest.raises(LeaseLost):
            opened.renew(keeper.lease)
    finally:
        opened.close()
        other.close()
        server.stop()


def test_a_connection_cut_mid_renewal_is_retried(
    backend: RedisBackend, durable: RedisServer, name: str
) -> None:
    lease = acquire(backend, name, ttl=3.0)
    # Writes wait 300 ms on the server, long enough to cut the renewal's connection while
    # it waits for its answer; the retry reconnects and is answered after the pause.
    durable.call("CLIENT", "PAUSE", 300, "WRITE")
    threading.Timer(0.1, durable.call, ("CLIENT", "KILL", "TYPE", "normal")).start()
    before = durable.call("INFO", "stats")["total_connections_received"]
    started = time.monotonic()
    renewed = backend.renew(lease)
    assert 0.25 < time.monotonic() - started < 1.0
    assert durable.call("INFO", "stats")["total_connections_received"] > before
    assert renewed.deadline > lease.deadline
    holder = backend.holder(name)
    assert holder is not None and holder.owner == lease.owner


def test_a_keeper_keeps_its_lease_through_repeated_client_kills(
    backend: RedisBackend, durable: RedisServer, name: str
) -> None:
    lease = acquire(backend, name, ttl=1.5)
    lost = threading.Event()
    keeper = LeaseKeeper(backend, lease, SYSTEM_CLOCK, on_lost=lambda _: lost.set()).start()
    try:
        end = time.monotonic() + 3 * lease.ttl
        kills = 0
        while time.monotonic() < end:
            kills += int(durable.call("CLIENT", "KILL", "TYPE", "normal"))
            time.sleep(0.05)
        assert kills > 5
        assert not lost.is_set()
        holder = backend.holder(name)
        assert holder is not None and holder.owner == lease.owner
    finally:
        keeper.stop()


def test_a_server_restarted_within_the_ttl_keeps_the_lease(tmp_path: Path, name: str) -> None:
    """Renewals fail while the server is down and are retried until the deadline."""
    server = RedisServer(tmp_path, aof=True).start()
    opened = RedisBackend(server.url)
    lost = threading.Event()
    failures: list[str] = []
    try:
        lease = acquire(opened, name, ttl=3.0)
        keeper = LeaseKeeper(
            opened,
            lease,
            SYSTEM_CLOCK,
            on_lost=lambda _: lost.set(),
            on_renewal_failed=failures.append,
        ).start()
        server.stop(signal.SIGKILL)
        time.sleep(1.2)
        server.start()
        time.sleep(lease.ttl)
        assert failures, "no renewal was attempted while the server was down"
        assert not lost.is_set()
        keeper.stop()
        holder = opened.holder(name)
        assert holder is not None and holder.owner == lease.owner
    finally:
        opened.close()
        server.stop()


def test_a_read_only_replica_is_unavailable_not_broken(
    tmp_path: Path, durable: RedisServer, name: str
) -> None:
    with redis_server(
        tmp_path, aof=False, extra=["--replicaof", "127.0.0.1", str(durable.port)]
    ) as replica:
        opened = RedisBackend(replica.url)
        try:
            with pytest.raises(BackendUnavailable, match="read only"):
                opened.try_acquire(name, 5.0, new_owner("a"))
        finally:
            opened.close()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (rex.ConnectionError("Connection closed by server."), BackendUnavailable),
        (rex.TimeoutError("Timeout reading from socket"), BackendUnavailable),
        (rex.BusyLoadingError("Redis is loading the dataset in memory"), BackendUnavailable),
        (rex.ReadOnlyError("You can't write against a read only replica."), BackendUnavailable),
        (rex.ResponseError("OOM command not allowed"), BackendError),
        (rex.NoPermissionError("NOPERM this user has no permissions"), BackendError),
    ],
)
def test_redis_errors_are_translated_at_the_boundary(
    error: Exception, kind: type[Exception]
) -> None:
    with pytest.raises(kind) as caught, translated("redis://u:s3cret@h:6379/0"):
        raise error
    assert type(caught.value) is kind and caught.value.__cause__ is error
    assert "s3cret" not in str(caught.value) and str(error) in str(caught.value)


def test_an_unreachable_server_is_unavailable_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(BackendUnavailable) as caught:
        RedisBackend(f"redis://u:s3cret@127.0.0.1:{free_port()}/0")
    assert time.monotonic() - started < 2.0
    assert "s3cret" not in str(caught.value) and "***" in str(caught.value)


# -- standby -------------------------------------------------------------------------------------


def test_wait_is_woken_by_a_release_promptly(
    backend: RedisBackend, durable: RedisServer, name: str
) -> None:
    other = RedisBackend(durable.url)
    try:
        other.wait(name, 0.01)  # subscribe
        lease = acquire(backend, name)
        threading.Timer(0.3, backend.release, (lease,)).start()
        started = time.monotonic()
        other.wait(name, 10.0)
        assert 0.25 < time.monotonic() - started < 0.3 + 0.2
    finally:
        other.close()


def test_a_release_between_a_failed_acquire_and_wait_is_not_missed(
    backend: RedisBackend, durable: RedisServer, name: str
) -> None:
    other = RedisBackend(durable.url)
    try:
        other.wait(name + "-other", 0.01)  # subscribed, but has never waited on `name`
        listener = other._listener
        assert listener is not None and listener.subscribed.wait(5.0), "a loaded machine"
        lease = acquire(backend, name)
        assert other.try_acquire(name, 5.0, new_owner("b")) is None
        backend.release(lease)
        time.sleep(0.1)
        started = time.monotonic()
        other.wait(name, 10.0)
        assert time.monotonic() - started < 0.2
    finally:
        other.close()


def test_fifty_waiters_cost_commands_in_proportion_per_release(
    durable: RedisServer, name: str
) -> None:
    holder_side = RedisBackend(durable.url)
    waiters = [RedisBackend(durable.url) for _ in range(50)]
    won: list[Lease] = []
    stop = threading.Event()

    def standby(side: RedisBackend) -> None:
        while not stop.is_set():
            lease = side.try_acquire(name, 30.0, new_owner("w"))
            if lease is not None:
                won.append(lease)
                return
            side.wait(name, 5.0)

    lease = acquire(holder_side, name, ttl=30.0)
    threads = [threading.Thread(target=standby, args=(side,)) for side in waiters]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # every waiter has tried once and blocks
        idle_before = durable.commandstats()
        time.sleep(1.0)
        idle = commands_between(idle_before, durable.commandstats())
        assert idle.get("evalsha", 0) == 0, f"waiters busy-loop while the lock is held: {idle}"
        before = durable.commandstats()
        holder_side.release(lease)
        time.sleep(1.0)
        calls = commands_between(before, durable.commandstats())
        assert len(won) == 1
        # One release, then each waiter tries once (the losers' next wait blocks again).
        assert 50 <= calls.get("evalsha", 0) <= 2 * 50 + 5, calls
    finally:
        stop.set()
        for side in waiters:
            side.evict(name)  # wakes every waiter so that its thread ends
        for thread in threads:
            thread.join(timeout=10)
        for side in [holder_side, *waiters]:
            side.close()


def test_wait_polls_with_backoff_without_a_subscription(
    backend: RedisBackend, durable: RedisServer, name: str
) -> None:
    lease = acquire(backend, name, ttl=0.6)
    other = RedisBackend(durable.url)
    try:
        listener = other._listen()
        listener.close()  # as if the subscriber could not connect
        listener.subscribed.clear()
        before = durable.commandstats()
        started = time.monotonic()
        other.wait(name, 5.0)
        waited = time.monotonic() - started
        assert waited < lease.ttl + 2.0, "the poll did not notice the expiry"
        polls = commands_between(before, durable.commandstats()).get("evalsha", 0)
        assert polls <= 12, f"{polls} polls in {waited:.1f}s: no back-off"
    finally:
        other.close()


# -- ledger retention, history, clock ------------------------------------------------------------


def test_prune_bounds_the_ledger_across_batches(durable: RedisServer, name: str) -> None:
    backend = RedisBackend(durable.url, prefix=name)  # prune covers every job of a prefix
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(1200):
        backend.skip(make_run(name, base + timedelta(minutes=i)), "misfired", "r1")
    running = make_run(name, base - timedelta(days=1))
    backend.claim(running, acquire(backend, name))
    keys = backend.keys.job(name)
    client = backend.scripts.client

    assert backend.prune(base + timedelta(minutes=100), keep=1000) == 201
    assert len(backend.history(name, 0)) == 1000
    assert backend.prune(base, keep=10) == 990
    states = [a.state for a in backend.history(name, 0)]
    assert len(states) == 10 and states[0] == RUNNING
    assert client.zcard(keys.index) == 10
    assert client.hlen(keys.runs) == 10
    assert len(list(client.scan_iter(match=keys.attempts + "*", count=1000))) == 10
    assert int(client.get(keys.highest) or 0) >= 1
    backend.close()


def test_history_of_all_jobs_is_newest_first(backend: RedisBackend, name: str) -> None:
    base = datetime(2026, 1, 1, tzinfo=UTC)
    for i, job in enumerate([name + "-a", name + "-b", name + "-a"]):
        backend.skip(make_run(job, base + timedelta(minutes=i)), "misfired", "r1")
    mine = [a for a in backend.history(None, 0) if a.job.startswith(name)]
    assert [a.job for a in mine] == [name + "-a", name + "-b", name + "-a"]
    assert mine[0].scheduled_at > mine[2].scheduled_at


def test_server_time_agrees_with_this_host(backend: RedisBackend) -> None:
    server = backend.server_time()
    assert server is not None and server.tzinfo is not None
    assert abs((server - datetime.now(UTC)).total_seconds()) < 0.5


def test_check_refuses_a_host_clock_ahead_of_redis_time(tmp_path: Path, plain: RedisServer) -> None:
    assert FAKETIME.exists(), "faketime is missing: run scripts/install-servers"
    config = write_config(tmp_path / "c.yaml", plain.url, "singleton")
    env = dict(
        os.environ,
        LD_PRELOAD=str(FAKETIME),
        FAKETIME="+30s",
        FAKETIME_DONT_FAKE_MONOTONIC="1",
        PYTHONPATH=str(ROOT),
    )
    out = subprocess.run(
        [sys.executable, "-m", "singleton", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 78, out.stderr
    assert "clock skew -30" in out.stderr and "max_skew" in out.stderr, out.stderr


# -- URLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis://u:s3cret@127.0.0.1:notaport/0", "Port"),
        ("redis://u:s3cret@127.0.0.1:6379/abc", "database number"),
        ("redis://u:s3cret@127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis://u:s3cret@127.0.0.1:{port}/0?bogus=1", "bogus"),
    ],
)
def test_url_mistakes_are_one_line_config_errors(
    url: str, match: str, durable: RedisServer
) -> None:
    with pytest.raises(ConfigError, match=match) as caught:
        RedisBackend(url.format(port=durable.port))
    message = str(caught.value)
    assert "\n" not in message and "s3cret" not in message, message


def test_unix_socket_urls(tmp_path: Path, name: str) -> None:
    with redis_server(tmp_path, aof=True, unix_socket=True) as server:
        opened = open_backend(server.unix_url)
        try:
            assert opened.capabilities.fencing
            lease = opened.try_acquire(name, 5.0, new_owner("a"))
            assert lease is not None
            assert server.admin.get(KeySpace().job(name).lock) == lease.owner
        finally:
            opened.close()


def test_tls_urls(tmp_path: Path, name: str) -> None:
    with redis_server(tmp_path, aof=True, tls=True) as server:
        opened = open_backend(server.url)
        try:
            assert server.url.startswith("rediss://")
            assert opened.capabilities.fencing
            lease = opened.try_acquire(name, 5.0, new_owner("a"))
            assert lease is not None
            assert server.admin.get(KeySpace().job(name).lock) == lease.owner
        finally:
            opened.close()
        untrusted = f"rediss://u:s3cret@127.0.0.1:{server.port}/0"
        with pytest.raises(BackendUnavailable, match="certificate verify failed") as caught:
            RedisBackend(untrusted)
        assert "\n" not in str(caught.value) and "s3cret" not in str(caught.value)


def test_a_wrong_password_is_a_config_error_without_the_password(durable: RedisServer) -> None:
    with pytest.raises(ConfigError, match=r"\*\*\*") as caught:
        RedisBackend(f"redis://nobody:s3cret@127.0.0.1:{durable.port}/0")
    assert "s3cret" not in str(caught.value)


def test_an_acl_user_that_may_not_run_scripts_is_a_config_error(durable: RedisServer) -> None:
    durable.call("ACL", "SETUSER", "reader", "on", ">pw", "~*", "+@read", "+@connection")
    try:
        with pytest.raises(ConfigError, match=r"NOPERM|permission"):
            RedisBackend(f"redis://reader:pw@127.0.0.1:{durable.port}/0")
    finally:
        durable.call("ACL", "DELUSER", "reader")
