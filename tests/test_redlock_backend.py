"""What the Redlock backend promises beyond the shared contract, on real ``redis-server``
processes: the quorum (one node down works, two down refuse, a paused node is a down node),
grants refused past their validity, release everywhere, split votes, honest capabilities
(no fencing, so ``ownership`` is refused at start), tokens that can repeat across majorities
and are levelled by ``evict``, the ledger on a quorum (it survives any one node, and a node
that missed a run is brought up), polling standbys, and URL mistakes."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from singleton.app import load
from singleton.backends import open_backend
from singleton.backends.base import FAILED, RUNNING, SUCCEEDED, Lease, Outcome, new_owner
from singleton.backends.redis import KeySpace
from singleton.backends.redlock import RedlockBackend
from singleton.clock import SYSTEM_CLOCK
from singleton.errors import BackendUnavailable, ConfigError, LeaseLost
from singleton.lease import LeaseKeeper
from singleton.testing.contract import make_run
from tests.servers import free_port
from tests.servers.redis import RedisServer, redis_server, redis_servers, redlock_url

pytestmark = pytest.mark.server

#: A short node timeout, so that a paused node costs each call little.
FAST = "200ms"


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    """Three nodes shared by the tests that leave them running (a pause is resumed)."""
    with redis_servers(tmp_path_factory.mktemp("trio"), 3) as servers:
        yield servers


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[list[RedisServer]]:
    """Three nodes of this test's own, to stop and start."""
    with redis_servers(tmp_path, 3) as servers:
        yield servers


@pytest.fixture
def backend(trio: list[RedisServer]) -> Iterator[RedlockBackend]:
    opened = RedlockBackend(redlock_url(trio), timeout=FAST)
    yield opened
    opened.close()


@pytest.fixture
def name() -> str:
    return f"job-{uuid.uuid4().hex[:10]}"


def acquire(backend: RedlockBackend, name: str, ttl: float = 5.0) -> Lease:
    lease = backend.try_acquire(name, ttl, new_owner("test"))
    assert lease is not None
    return lease


def locks(servers: list[RedisServer], name: str) -> list[str | None]:
    """The owner each node holds ``name`` for."""
    return [server.admin.get(KeySpace().job(name).lock) for server in servers]


def counters(servers: list[RedisServer], name: str) -> list[int]:
    return [int(server.admin.get(KeySpace().job(name).token) or 0) for server in servers]


def write_config(path: Path, url: str, mode: str) -> Path:
    body = {
        "backend": {"url": url},
        "jobs": {"shard": {"every": "10s", "mode": mode, "command": ["true"]}},
    }
    path.write_text(yaml.safe_dump(body))
    return path


# -- capabilities ------------------------------------------------------------------------------


def test_capabilities_declare_no_fencing_and_polling_standbys(backend: RedlockBackend) -> None:
    caps = backend.capabilities
    assert (caps.fencing, caps.shared, caps.notify) == (False, True, False)
    assert caps.min_ttl == pytest.approx(0.4)


def test_an_ownership_job_is_refused_at_start_with_one_line(
    tmp_path: Path, trio: list[RedisServer]
) -> None:
    url = redlock_url(trio, auth="u:s3cret")
    for server in trio:
        server.call("ACL", "SETUSER", "u", "on", ">s3cret", "~*", "&*", "+@all")
    refused = load(write_config(tmp_path / "own.yaml", url, "ownership"))
    with pytest.raises(ConfigError) as caught:
        refused.open_backend()
    message = str(caught.value)
    assert message.startswith("jobs.shard: mode ownership needs a backend with fencing;")
    assert "redlock://u:***@127.0.0.1:" in message and "s3cret" not in message
    assert "its safety rests on timing assumptions" in message
    assert "\n" not in message
    for mode in ("singleton", "efficiency"):
        load(write_config(tmp_path / f"{mode}.yaml", url, mode)).open_backend().close()


# -- the URL -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "match"),
    [
        ("h1:6379", "redlock needs an odd number \\(≥3\\) of independent masters; got 1$"),
        ("h1,h2", "got 2$"),
        ("h1,h2,h3,h4", "redlock needs an odd number \\(≥3\\) of independent masters; got 4$"),
        ("h1,h2,H1:6379", "duplicate node h1:6379$"),
        ("h1:1,h2:2,h1:01", "duplicate node h1:1$"),
        ("h1,,h3", "an empty node in the list$"),
        ("h1:port,h2,h3", "node 'h1:port'"),
    ],
)
def test_url_mistakes_are_one_line_config_errors(nodes: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as caught:
        open_backend(f"redlock://u:s3cret@{nodes}/0")
    message = str(caught.value)
    assert "\n" not in message and "s3cret" not in message and "u:***@" in message


def test_the_path_must_be_a_database_number() -> None:
    with pytest.raises(ConfigError, match="the path must be a database number"):
        RedlockBackend("redlock://h1,h2,h3/zero")


def test_one_server_under_two_names_is_a_duplicate_node(trio: list[RedisServer]) -> None:
    a, b, _ = trio
    url = f"redlock://127.0.0.1:{a.port},localhost:{a.port},127.0.0.1:{b.port}/0"
    with pytest.raises(ConfigError, match=f"duplicate node localhost:{a.port}: the same server"):
        RedlockBackend(url)


def test_a_replica_is_not_an_independent_master(tmp_path: Path, trio: list[RedisServer]) -> None:
    a, b, _ = trio
    with redis_server(tmp_path, aof=False, extra=["--replicaof", "127.0.0.1", str(a.port)]) as rep:
        url = f"redlock://127.0.0.1:{a.port},127.0.0.1:{b.port},127.0.0.1:{rep.port}/0"
        with pytest.raises(ConfigError, match=f"node 127.0.0.1:{rep.port} is not a master"):
            RedlockBackend(url)


def test_a_majority_unreachable_at_start_is_unavailable() -> None:
    ports = [free_port() for _ in range(3)]
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match="no majority of the 3 nodes decided, 3 failed"):
        RedlockBackend("redlock://" + ",".join(f"127.0.0.1:{p}" for p in ports))
    assert time.monotonic() - started < 2.0


# -- the lock on a quorum ----------------------------------------------------------------------


def test_a_lease_holds_the_lock_on_every_node_and_release_frees_them_all(
    backend: RedlockBackend, trio: list[RedisServer], name: str
) -> None:
    lease = acquire(backend, name)
    assert locks(trio, name) == [lease.owner] * 3
    backend.release(lease)
    assert locks(trio, name) == [None, None, None]


def test_the_token_is_the_highest_of_the_granting_nodes(
    backend: RedlockBackend, trio: list[RedisServer], name: str
) -> None:
    trio[1].admin.set(KeySpace().job(name).token, 41)
    assert acquire(backend, name).token == 42
    assert counters(trio, name) == [1, 42, 1]


def test_a_lock_held_on_a_minority_only_is_granted(
    backend: RedlockBackend, trio: list[RedisServer], name: str
) -> None:
    trio[0].admin.set(KeySpace().job(name).lock, "stale:owner", px=5000)
    lease = acquire(backend, name)
    holder = backend.holder(name)
    assert holder is not None and holder.owner == lease.owner
    assert locks(trio, name) == ["stale:owner", lease.owner, lease.owner]


def test_a_split_vote_is_released_everywhere_and_refused(
    backend: RedlockBackend, trio: list[RedisServer], name: str
) -> None:
    trio[0].admin.set(KeySpace().job(name).lock, "x:1", px=5000)
    trio[1].admin.set(KeySpace().job(name).lock, "y:1", px=5000)
    started = time.monotonic()
    assert backend.try_acquire(name, 5.0, new_owner("z")) is None
    assert time.monotonic() - started < 0.5
    assert locks(trio, name) == ["x:1", "y:1", None]
    assert backend.holder(name) is None
    assert counters(trio, name)[2] == 3, "two retries after the first try, each granted there"


def test_one_node_down_grants_renews_records_and_releases(
    fresh: list[RedisServer], name: str
) -> None:
    fresh[0].stop()
    opened = RedlockBackend(redlock_url(fresh), timeout=FAST)
    try:
        run = make_run(name)
        got = opened.acquire_and_claim(run, 5.0, new_owner("a"))
        assert got is not None
        lease, claim = got
        assert claim.attempt is not None and claim.attempt.state == RUNNING
        lease = opened.renew(lease)
        assert opened.finish_and_release(run, lease, 1, Outcome(SUCCEEDED))
        assert locks(fresh[1:], name) == [None, None]
        assert [a.state for a in opened.attempts(run.run_id)] == [SUCCEEDED]
        assert [a.run_id for a in opened.history(name, 0)] == [run.run_id]
    finally:
        opened.close()


def test_two_nodes_down_refuse_with_backend_unavailable(
    fresh: list[RedisServer], name: str
) -> None:
    opened = RedlockBackend(redlock_url(fresh), timeout=FAST)
    try:
        fresh[0].stop()
        fresh[2].stop()
        started = time.monotonic()
        with pytest.raises(
            BackendUnavailable, match="no majority of the 3 nodes decided, 2 failed"
        ):
            opened.try_acquire(name, 5.0, new_owner("a"))
        assert time.monotonic() - started < 1.0
        assert locks(fresh[1:2], name) == [None], "the lone grant was released"
    finally:
        opened.close()


def test_a_paused_node_counts_as_a_down_node(
    backend: RedlockBackend, trio: list[RedisServer], name: str
) -> None:
    trio[2].pause()
    try:
        started = time.monotonic()
        lease = acquire(backend, name)
        assert time.monotonic() - started < 0.2 + 0.3, "one timeout for the paused node"
        backend.release(lease)
        trio[1].pause()
        with pytest.raises(BackendUnavailable, match="Timeout"):
            backend.try_acquire(name + "-2", 5.0, new_owner("a"))
    finally:
        trio[1].resume()
        trio[2].resume()


def test_a_grant_that_arrives_after_its_validity_is_released_and_refused(
    trio: list[RedisServer], name: str
) -> None:
    """Two nodes answer after 0.5 s (paused, well within the 2 s timeout): a majority
    granted, but a 0.3 s lease has no validity left by then."""
    opened = RedlockBackend(redlock_url(trio), timeout="2s")
    try:
        trio[0].pause()
        trio[1].pause()
        threading.Timer(0.5, lambda: (trio[0].resume(), trio[1].resume())).start()
        with pytest.raises(BackendUnavailable, match=r"took 0\.\d+s, past the validity"):
            opened.try_acquire(name, 0.3, new_owner("slow"))
        assert locks(trio, name) == [None, None, None]
    finally:
        trio[0].resume()
        trio[1].resume()
        opened.close()


def test_renewal_is_refused_once_a_majority_lost_the_lease(
    backend: RedlockBackend, trio: list[RedisServer], name: str
) -> None:
    lease = acquire(backend, name)
    trio[0].admin.set(KeySpace().job(name).lock, "thief:1")
    lease = backend.renew(lease)
    trio[1].admin.set(KeySpace().job(name).lock, "thief:1")
    with pytest.raises(LeaseLost):
        backend.renew(lease)
    holder = backend.holder(name)
    assert holder is not None and holder.owner == "thief:1"


def test_a_keeper_loses_the_lease_by_its_deadline_when_a_majority_pauses(
    backend: RedlockBackend, trio: list[RedisServer], name: str
) -> None:
    lease = acquire(backend, name, ttl=1.2)
    lost = threading.Event()
    keeper = LeaseKeeper(backend, lease, SYSTEM_CLOCK, on_lost=lambda _: lost.set()).start()
    time.sleep(0.1)
    trio[0].pause()
    trio[1].pause()
    try:
        assert lost.wait(3.0), "the keeper never gave the lease up"
        late = time.monotonic() - lease.deadline
        assert late < 0.2 + 0.3, f"lost {late:.2f}s after the deadline"
    finally:
        trio[0].resume()
        trio[1].resume()
        keeper.stop()


def test_a_clock_jump_on_one_node_lets_a_second_owner_in_while_the_first_holds(
    fresh: list[RedisServer], name: str
) -> None:
    """Predicted, not prevented: Redlock rests on the nodes' clocks (TESTING.md T3). A holds
    a majority {0, 1} (node 2 was down); node 1's clock jumps past the lease, so B finds the
    lock free on {1, 2}, a majority, while A's lease has most of its validity left. This is
    why Redlock declares no fencing and refuses ``ownership``."""
    url = redlock_url(fresh)
    first_owner, second_owner = RedlockBackend(url, timeout=FAST), RedlockBackend(url, timeout=FAST)
    try:
        fresh[2].stop()
        first = acquire(first_owner, name, ttl=30.0)
        fresh[2].start()
        fresh[1].jump_clock(60)
        second = second_owner.try_acquire(name, 30.0, new_owner("second"))

        assert second is not None, "the predicted second majority"
        assert time.monotonic() < first.deadline - 20, "while the first lease is valid"
        assert locks(fresh, name) == [first.owner, second.owner, second.owner]
        with pytest.raises(LeaseLost):
            first_owner.renew(first)  # A finds out only at its next renewal
    finally:
        first_owner.close()
        second_owner.close()


# -- tokens ------------------------------------------------------------------------------------


def test_a_grant_by_another_majority_can_repeat_a_token_and_evict_repairs_it(
    tmp_path: Path, name: str
) -> None:
    """Why Redlock declares no fencing: each node counts only the grants it saw."""
    with redis_servers(tmp_path, 3, aof=True) as (a, b, c):
        opened = RedlockBackend(redlock_url([a, b, c]), timeout=FAST)
        try:
            tokens = []
            for down in (c, a, b):  # majorities {a, b}, {b, c}, {a, c}
                down.stop()
                lease = acquire(opened, name)
                tokens.append(lease.token)
                opened.release(lease)
                down.start()
            assert tokens == [1, 2, 2]
            assert opened.evict(name, tokens[-1]) == 2
            assert acquire(opened, name).token == 3
        finally:
            opened.close()


def test_evict_levels_every_nodes_counter(fresh: list[RedisServer], name: str) -> None:
    opened = RedlockBackend(redlock_url(fresh), timeout=FAST)
    try:
        fresh[2].stop()
        for _ in range(2):
            opened.release(acquire(opened, name))
        fresh[2].start()
        assert counters(fresh, name) == [2, 2, 0]
        assert opened.evict(name) == 2
        assert counters(fresh, name) == [2, 2, 2]
    finally:
        opened.close()


# -- the ledger on a quorum --------------------------------------------------------------------


def test_the_ledger_survives_the_loss_of_any_one_node(fresh: list[RedisServer], name: str) -> None:
    run = make_run(name)
    url = redlock_url(fresh)
    first = RedlockBackend(url, timeout=FAST)
    got = first.acquire_and_claim(run, 5.0, new_owner("a"))
    assert got is not None
    assert first.finish_and_release(run, got[0], 1, Outcome(SUCCEEDED))
    first.close()
    fresh[0].stop()  # the first listed node
    second = RedlockBackend(url, timeout=FAST)
    try:
        again = second.acquire_and_claim(run, 5.0, new_owner("b"))
        assert again is not None
        assert again[1].attempt is None
        assert again[1].latest is not None and again[1].latest.state == SUCCEEDED
        assert [a.state for a in second.history(name, 0)] == [SUCCEEDED]
    finally:
        second.close()


def test_a_finish_brings_up_a_node_that_missed_the_run(fresh: list[RedisServer], name: str) -> None:
    """The node that was down during the claim comes back empty; then another node fails:
    the outcome still reaches a majority, because the finish copies the run there."""
    a, _, c = fresh
    opened = RedlockBackend(redlock_url(fresh), timeout=FAST)
    try:
        run = make_run(name)
        c.stop()
        got = opened.acquire_and_claim(run, 5.0, new_owner("a"))
        assert got is not None
        c.start()
        a.stop()
        assert opened.finish_and_release(run, got[0], 1, Outcome(SUCCEEDED))
        keys = KeySpace().job(name)
        assert c.admin.hget(keys.attempt(run.run_id, 1), "state") == SUCCEEDED
        assert c.admin.hget(keys.runs, run.run_id) == "1"
        assert [x.state for x in opened.attempts(run.run_id)] == [SUCCEEDED]
    finally:
        opened.close()


def test_a_claim_brings_up_a_node_that_missed_earlier_attempts(
    fresh: list[RedisServer], name: str
) -> None:
    """Attempts 1 and 2 were written while c was down; the owner died. The next owner holds
    b and c only (a is down now): its claim of attempt 3 lacks a majority until c has the
    run's earlier attempts."""
    a, _, c = fresh
    opened = RedlockBackend(redlock_url(fresh), timeout=FAST)
    try:
        run = make_run(name)
        c.stop()
        first = acquire(opened, name, ttl=0.5)
        opened.claim(run, first)
        opened.finish(run, first, 1, Outcome(FAILED, "exit 1"))
        assert opened.claim(run, first, seen=1).attempt is not None
        c.start()
        a.stop()
        time.sleep(first.ttl)
        second = acquire(opened, name)
        found = opened.claim(run, second)
        assert found.attempt is None
        assert found.latest is not None and (found.latest.attempt, found.latest.state) == (
            2,
            RUNNING,
        )
        taken = opened.claim(run, second, seen=2)
        assert taken.attempt is not None and taken.attempt.attempt == 3
        keys = KeySpace().job(name)
        assert c.admin.hget(keys.runs, run.run_id) == "3"
        states = [(x.attempt, x.state) for x in opened.attempts(run.run_id)]
        assert states == [(3, RUNNING), (2, "abandoned"), (1, FAILED)]
    finally:
        opened.close()


# -- standby and clock -------------------------------------------------------------------------


def test_wait_polls_with_backoff_while_the_lock_is_held(
    backend: RedlockBackend, trio: list[RedisServer], name: str
) -> None:
    acquire(backend, name)
    before = trio[0].commandstats().get("evalsha", 0)
    started = time.monotonic()
    backend.wait(name, 2.0)
    assert time.monotonic() - started == pytest.approx(2.0, abs=0.2)
    polls = trio[0].commandstats().get("evalsha", 0) - before
    assert 3 <= polls <= 6, f"{polls} polls in 2s"


def test_wait_returns_when_the_lease_expires(backend: RedlockBackend, name: str) -> None:
    lease = acquire(backend, name, ttl=0.5)
    started = time.monotonic()
    backend.wait(name, 5.0)
    assert lease.ttl - 0.05 <= time.monotonic() - started < lease.ttl + 1.2


def test_server_time_agrees_with_this_host(backend: RedlockBackend) -> None:
    server = backend.server_time()
    assert server is not None and server.tzinfo is not None
    assert abs(server.timestamp() - time.time()) < 0.5
