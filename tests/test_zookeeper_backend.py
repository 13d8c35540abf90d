"""What the ZooKeeper backend promises beyond the shared contract: czxid tokens, one woken
standby per release, leases bound to the session (suspended, lost, a dead holder), the
ledger's atomic claim, and the faults of a server and of an ensemble.

Faults are real: servers are killed, paused (SIGSTOP) and restarted; a session is expired
from a second client that takes it over, as ZooKeeper's own tests do.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError

from singleton.backends import open_backend
from singleton.backends.base import SUCCEEDED, Lease, Outcome, new_owner
from singleton.backends.zookeeper import WAITER_LINGER, ZookeeperBackend, parse_url
from singleton.clock import SYSTEM_CLOCK
from singleton.errors import BackendUnavailable, ConfigError, LeaseLost
from singleton.lease import LeaseKeeper
from singleton.testing.contract import make_run
from tests.chaos.proxy import Proxy
from tests.replicas import skewed, wait_for
from tests.servers import free_port

if TYPE_CHECKING:
    from tests.servers.zookeeper import ZookeeperEnsemble, ZookeeperServer

pytest_plugins = ["tests.servers.zookeeper"]

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def opened(url: str, session_timeout: float = 4.0) -> Iterator[ZookeeperBackend]:
    backend = ZookeeperBackend(url, session_timeout=session_timeout)
    try:
        yield backend
    finally:
        backend.close()


@contextmanager
def raw_client(hosts: str, **options: Any) -> Iterator[Any]:
    """A plain kazoo client, to look at (or tamper with) the znodes behind the backend."""
    client = KazooClient(hosts=hosts, **options)
    client.start(timeout=10)
    try:
        yield client
    finally:
        client.stop()
        client.close()


@contextmanager
def through_proxy(server: ZookeeperServer) -> Iterator[tuple[str, Proxy]]:
    """A URL for ``server`` through a proxy, to refuse connections (``reset``) while the
    server restarts, until it takes sessions: a client that connects while a restarting
    server answers ``ruok`` but takes no session yet gets no reply to its handshake, and
    kazoo waits the whole session timeout for one (seen on CI)."""
    proxy = Proxy(server.address)
    try:
        yield server.url().replace(server.address, proxy.address), proxy
    finally:
        proxy.close()


def acquire(backend: ZookeeperBackend, name: str, ttl: float = 30.0) -> Lease:
    lease = backend.try_acquire(name, ttl, new_owner("test"))
    assert lease is not None, f"{name} should have been free"
    return lease


def eventually(backend: ZookeeperBackend, name: str, what: str, timeout: float = 10.0) -> Lease:
    """Acquire ``name`` once it is free and the backend has (re)connected."""

    def attempt() -> Lease | None:
        try:
            return backend.try_acquire(name, 30, new_owner("eventually"))
        except BackendUnavailable:
            return None

    return wait_for(what, attempt, timeout)


def lock_dir(url: str, name: str) -> str:
    return f"{parse_url(url).prefix}/locks/{name}"


def watched_paths(server: ZookeeperServer) -> dict[str, int]:
    """Watches per path, as the server reports them (``wchp``)."""
    counts: dict[str, int] = {}
    path = None
    for line in server.ask("wchp").splitlines():
        if line.startswith("/"):
            path = line.strip()
            counts[path] = 0
        elif line.strip() and path is not None:
            counts[path] += 1
    return counts


def keeper_for(backend: ZookeeperBackend, lease: Lease) -> tuple[LeaseKeeper, list[Lease]]:
    """A running lease keeper, and the list of its successful renewals."""
    renewed: list[Lease] = []
    keeper = LeaseKeeper(
        backend, lease, SYSTEM_CLOCK, on_lost=lambda reason: None, on_renewed=renewed.append
    )
    return keeper.start(), renewed


# -- the URL and the session ------------------------------------------------------------------


def test_the_url_names_servers_prefix_and_digest_credentials() -> None:
    target = parse_url("zookeeper://ops:s%40cret@zk1,zk2:2182,[::1]:2183/jobs/prod")
    assert target.hosts == "zk1:2181,zk2:2182,[::1]:2183"
    assert target.prefix == "/jobs/prod"
    assert target.credentials == ("ops", "s@cret")
    assert parse_url("zookeeper://zk1").prefix == "/singleton"


@pytest.mark.parametrize(
    "url",
    [
        "zookeeper://ops:hunter2@zk1:notaport/x",
        "zookeeper://ops:hunter2@zk1,,zk2/x",
        "zookeeper://ops:hunter2@zk1/a//b",
        "zookeeper://ops:hunter2@zk1/x?session_timeout=5s",
    ],
)
def test_a_bad_url_is_one_config_error_without_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        ZookeeperBackend(url)
    assert "hunter2" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_session_timeout_option_is_a_positive_duration() -> None:
    with pytest.raises(ConfigError, match="session_timeout"):
        open_backend("zookeeper://127.0.0.1/x", session_timeout="0s")
    with pytest.raises(ConfigError, match="no unit"):
        open_backend("zookeeper://127.0.0.1/x", session_timeout="10")


@pytest.mark.server
def test_no_server_answering_is_backend_unavailable() -> None:
    with pytest.raises(BackendUnavailable, match="no server answered"):
        ZookeeperBackend(f"zookeeper://u:hunter2@127.0.0.1:{free_port()}/x", session_timeout=1)


@pytest.mark.server
def test_the_granted_session_timeout_is_exposed_and_caps_every_lease(
    zookeeper: ZookeeperServer,
) -> None:
    url = zookeeper.url()
    with opened(url, session_timeout=0.2) as short:
        assert short.session_timeout == 1.0  # minSessionTimeout, two ticks
    with opened(url, session_timeout="100s") as long:
        assert long.session_timeout == 60.0  # maxSessionTimeout
        assert acquire(long, "capped", ttl=600).ttl == 60.0
    with opened(url, session_timeout=4) as backend:
        assert acquire(backend, "capped-4", ttl=30).ttl == 4.0
        assert acquire(backend, "kept", ttl=2).ttl == 2.0


def check(tmp_path: Path, url: str, env: dict[str, str] | None = None) -> Any:
    """``singleton check`` in a process of its own, on a one-job config (lock_ttl 2s)."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f"backend:\n  url: {url}\n  session_timeout: 4s\n"
        "jobs:\n  quick:\n    every: 5s\n    lock_ttl: 2s\n    command: ['true']\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "singleton", "check", str(config)],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
        timeout=60,
    )


@pytest.mark.server
def test_check_warns_when_a_lock_ttl_is_shorter_than_the_session_timeout(
    zookeeper: ZookeeperServer, tmp_path: Path
) -> None:
    done = check(tmp_path, zookeeper.url())
    assert done.returncode == 0, done.stderr
    assert "jobs.quick.lock_ttl 2s is shorter than the granted session timeout 4s" in done.stderr


@pytest.mark.server
def test_check_refuses_a_host_clock_ahead_of_the_leaders(
    zookeeper: ZookeeperServer, tmp_path: Path
) -> None:
    done = check(tmp_path, zookeeper.url(), skewed("+30s"))
    assert done.returncode == 78, done.stderr
    assert "clock skew -30" in done.stderr and "max_skew" in done.stderr, done.stderr


@pytest.mark.server
def test_digest_credentials_keep_other_identities_out(zookeeper: ZookeeperServer) -> None:
    url = zookeeper.url("ops:right")
    with opened(url) as backend:
        backend.claim(make_run("guarded"), acquire(backend, "guarded"))
        with raw_client(zookeeper.address) as anonymous, pytest.raises(NoAuthError):
            anonymous.get_children(f"{parse_url(url).prefix}/runs")
    wrong = url.replace("ops:right", "ops:wrong")
    with pytest.raises(ConfigError, match="do not grant access") as caught:
        ZookeeperBackend(wrong)
    assert "wrong" not in str(caught.value)


# -- the lock ---------------------------------------------------------------------------------


@pytest.mark.server
def test_the_token_is_the_lock_nodes_czxid(zookeeper: ZookeeperServer) -> None:
    url = zookeeper.url()
    with opened(url) as backend, raw_client(zookeeper.address) as raw:
        lease = acquire(backend, "czxid")
        (node,) = raw.get_children(lock_dir(url, "czxid"))
        _, stat = raw.get(f"{lock_dir(url, 'czxid')}/{node}")
        assert lease.token == stat.czxid


@pytest.mark.server
def test_tokens_keep_rising_across_a_deleted_and_recreated_lock_path(
    zookeeper: ZookeeperServer,
) -> None:
    url = zookeeper.url()
    path = lock_dir(url, "recreated")
    with opened(url) as backend, raw_client(zookeeper.address) as raw:
        first = acquire(backend, "recreated")
        (first_node,) = raw.get_children(path)
        backend.release(first)
        raw.delete(path, recursive=True)
        second = acquire(backend, "recreated")
        (second_node,) = raw.get_children(path)
    assert first_node.endswith("0000000000") and second_node.endswith("0000000000")
    assert second.token > first.token


@pytest.mark.server
def test_a_lost_try_acquire_leaves_no_node_behind(zookeeper: ZookeeperServer) -> None:
    url = zookeeper.url()
    with opened(url) as holder, opened(url) as other, raw_client(zookeeper.address) as raw:
        acquire(holder, "crowded")
        before = raw.get_children(lock_dir(url, "crowded"))
        assert other.try_acquire("crowded", 30, new_owner("b")) is None
        assert raw.get_children(lock_dir(url, "crowded")) == before


@pytest.mark.server
def test_each_release_wakes_exactly_one_standby(zookeeper: ZookeeperServer) -> None:
    url = zookeeper.url()
    name = "herd"
    wakes = [0, 0, 0]
    order: list[int] = []

    def stand_by(index: int, backend: ZookeeperBackend) -> None:
        while (lease := backend.try_acquire(name, 30, new_owner(f"s{index}"))) is None:
            backend.wait(name, 30)
            wakes[index] += 1
        order.append(index)
        backend.release(lease)

    with (
        opened(url) as owner,
        opened(url) as s0,
        opened(url) as s1,
        opened(url) as s2,
        raw_client(zookeeper.address) as raw,
    ):
        lease = acquire(owner, name)
        threads = []
        for index, backend in enumerate((s0, s1, s2)):
            thread = threading.Thread(target=stand_by, args=(index, backend))
            thread.start()
            threads.append(thread)
            wait_for(
                f"standby {index} in line",
                lambda n=index + 1: len(raw.get_children(lock_dir(url, name))) == n + 1,
                timeout=10,
            )
        watches = {p: n for p, n in watched_paths(zookeeper).items() if name in p}
        assert sorted(watches.values()) == [1, 1, 1], watches
        owner.release(lease)
        for thread in threads:
            thread.join(timeout=20)
    assert order == [0, 1, 2]
    assert wakes == [1, 1, 1], "a release woke more than the standby first in line"


@pytest.mark.server
def test_a_standby_that_stopped_waiting_leaves_the_line(zookeeper: ZookeeperServer) -> None:
    url = zookeeper.url()
    with opened(url) as holder, opened(url) as standby, raw_client(zookeeper.address) as raw:
        acquire(holder, "line")
        standby.wait("line", 0.1)
        assert len(raw.get_children(lock_dir(url, "line"))) == 2
        wait_for(
            "the idle standby's node to go",
            lambda: len(raw.get_children(lock_dir(url, "line"))) == 1,
            timeout=WAITER_LINGER + 3,
        )


@pytest.mark.server
def test_evict_past_the_zxid_raises_every_later_token_for_every_session(
    zookeeper: ZookeeperServer,
) -> None:
    url = zookeeper.url()
    with opened(url) as backend:
        held = acquire(backend, "restored")
        counter = backend.evict("restored", held.token + 10**9)
        assert counter >= held.token + 10**9
        with pytest.raises(LeaseLost):
            backend.renew(held)
    with opened(url) as later:
        first = acquire(later, "restored")
        later.release(first)
        second = acquire(later, "restored")
    assert counter < first.token < second.token


@pytest.mark.server
def test_a_dead_holder_keeps_the_lock_until_its_session_expires(
    zookeeper: ZookeeperServer,
) -> None:
    url = zookeeper.url()
    script = (
        "import sys, time\n"
        "from singleton.backends.zookeeper import ZookeeperBackend\n"
        "from singleton.backends.base import new_owner\n"
        "backend = ZookeeperBackend(sys.argv[1], session_timeout=2)\n"
        "lease = backend.try_acquire('dead', 0.5, new_owner('doomed'))\n"
        "print(lease.token, flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, url],
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        text=True,
    )
    try:
        assert holder.stdout is not None
        token = int(holder.stdout.readline())
        holder.kill()
        killed = time.monotonic()
        with opened(url) as standby:
            while (lease := standby.try_acquire("dead", 30, new_owner("b"))) is None:
                standby.wait("dead", 10)
            waited = time.monotonic() - killed
    finally:
        holder.kill()
        holder.communicate()
    assert lease.token > token
    # Not freed at the lease's 0.5 s: the node went with the session, two seconds (plus up
    # to one tick) after the servers last heard from the holder.
    assert 0.8 < waited < 4.0, f"the lock freed {waited:.1f}s after the holder died"


# -- session states ---------------------------------------------------------------------------


@pytest.mark.server
def test_renew_while_disconnected_is_unavailable_and_the_lease_survives_a_restart(
    fresh_zookeeper: ZookeeperServer,
) -> None:
    with through_proxy(fresh_zookeeper) as (url, proxy):
        with opened(url, session_timeout=12) as backend:
            lease = backend.renew(acquire(backend, "restart"))
            proxy.set_mode("reset")
            fresh_zookeeper.kill()
            with pytest.raises(BackendUnavailable):
                backend.renew(lease)
            fresh_zookeeper.start().wait_serving()
            proxy.set_mode("pass")

            def renewed() -> Lease | None:
                try:
                    return backend.renew(lease)
                except BackendUnavailable:
                    return None

            again = wait_for("a renewal after the restart", renewed, timeout=lease.ttl)
            holder = backend.holder("restart")
    assert again.token == lease.token
    assert holder is not None and holder.token == lease.token


@pytest.mark.server
def test_a_release_while_the_server_is_down_frees_the_lock_when_it_is_back(
    fresh_zookeeper: ZookeeperServer,
) -> None:
    with through_proxy(fresh_zookeeper) as (url, proxy):
        with opened(url, session_timeout=20) as backend:
            lease = acquire(backend, "later")
            proxy.set_mode("reset")
            fresh_zookeeper.kill()
            started = time.monotonic()
            backend.release(lease)
            assert time.monotonic() - started < 1.0, "release waited for the server"
            fresh_zookeeper.start().wait_serving()
            proxy.set_mode("pass")
            with opened(fresh_zookeeper.url()) as other:
                successor = eventually(other, "later", "the lock to be freed", timeout=10)
            # Well before the session could have expired: the backend deleted the node itself.
            assert time.monotonic() - started < 15
    assert successor.token > lease.token


@pytest.mark.server
def test_a_server_pause_shorter_than_the_lease_keeps_it(
    fresh_zookeeper: ZookeeperServer,
) -> None:
    with opened(fresh_zookeeper.url(), session_timeout=4) as backend:
        keeper, renewed = keeper_for(backend, acquire(backend, "paused"))
        try:
            wait_for("a first renewal", lambda: renewed, timeout=5)
            fresh_zookeeper.pause()
            time.sleep(1.0)
            fresh_zookeeper.resume()
            count = len(renewed)
            wait_for("renewals after the pause", lambda: len(renewed) >= count + 2, timeout=6)
            assert not keeper.lost
        finally:
            keeper.stop()


@pytest.mark.server
def test_a_server_pause_past_the_session_timeout_loses_the_lease(
    fresh_zookeeper: ZookeeperServer,
) -> None:
    url = fresh_zookeeper.url()
    with opened(url, session_timeout=2) as backend:
        lease = acquire(backend, "paused")
        keeper, _ = keeper_for(backend, lease)
        fresh_zookeeper.pause()
        try:
            wait_for("the lease to be lost", lambda: keeper.lost, timeout=4)
        finally:
            fresh_zookeeper.resume()
            keeper.stop()

        def refused() -> bool:
            try:
                backend.renew(keeper.lease)
            except LeaseLost:
                return True
            except BackendUnavailable:
                pass  # reconnecting, and the lease's last moments not yet over
            return False

        wait_for("the renewal to be refused", refused, timeout=5)
        with opened(url) as other:
            successor = eventually(other, "paused", "a successor")
    assert successor.token > lease.token


@pytest.mark.server
def test_an_expired_session_loses_every_lease_at_once(fresh_zookeeper: ZookeeperServer) -> None:
    url = fresh_zookeeper.url()
    with opened(url) as backend, opened(url) as other:
        leases = [acquire(backend, "first"), acquire(backend, "second")]
        run = make_run("first")
        # Take the session over from a second client and close it: the servers expire it.
        thief = KazooClient(hosts=fresh_zookeeper.address, client_id=backend._client.client_id)
        thief.start(timeout=10)
        thief.stop()
        thief.close()

        def lost(lease: Lease) -> bool:
            try:
                backend.renew(lease)
            except LeaseLost:
                return True
            except BackendUnavailable:
                pass
            return False

        wait_for("the session to be lost", lambda: lost(leases[0]), timeout=10)
        assert lost(leases[1])
        with pytest.raises(LeaseLost):
            backend.claim(run, leases[0])
        assert other.try_acquire("first", 30, new_owner("b")) is not None
        assert other.attempts(run.run_id) == []
        again = eventually(backend, "second", "the backend to work again in a new session")
    assert again.token > leases[1].token


# -- the ledger -------------------------------------------------------------------------------


@pytest.mark.server
def test_a_lock_node_deleted_behind_the_holder_refuses_its_claim_and_renewal(
    zookeeper: ZookeeperServer,
) -> None:
    url = zookeeper.url()
    run = make_run("stolen")
    with opened(url) as backend, raw_client(zookeeper.address) as raw:
        lease = acquire(backend, "stolen")
        (node,) = raw.get_children(lock_dir(url, "stolen"))
        raw.delete(f"{lock_dir(url, 'stolen')}/{node}")
        with pytest.raises(LeaseLost):
            backend.claim(run, lease)
        with pytest.raises(LeaseLost):
            backend.renew(lease)
        assert backend.attempts(run.run_id) == []


@pytest.mark.server
def test_the_highest_token_outlives_pruning_and_pruning_leaves_no_empty_nodes(
    zookeeper: ZookeeperServer,
) -> None:
    url = zookeeper.url()
    old = make_run("pruned", datetime(2020, 1, 1, tzinfo=UTC))
    with opened(url) as backend, raw_client(zookeeper.address) as raw:
        got = backend.acquire_and_claim(old, 30, new_owner("a"))
        assert got is not None
        backend.finish_and_release(old, got[0], 1, Outcome(SUCCEEDED))
        assert backend.prune(datetime(2021, 1, 1, tzinfo=UTC), keep=100) == 1
        assert raw.get_children(f"{parse_url(url).prefix}/runs/pruned") == []
        later = make_run("pruned", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=1))
        again = backend.acquire_and_claim(later, 30, new_owner("b"))
    assert again is not None
    assert again[1].highest == got[0].token


# -- an ensemble ------------------------------------------------------------------------------


@pytest.mark.server
def test_a_leader_failover_keeps_the_lock_and_the_ledger(fresh_ensemble: ZookeeperEnsemble) -> None:
    run = make_run("failover")
    with opened(fresh_ensemble.url(), session_timeout=6) as backend:
        got = backend.acquire_and_claim(run, 30, new_owner("a"))
        assert got is not None
        keeper, renewed = keeper_for(backend, got[0])
        try:
            fresh_ensemble.leader().kill()
            fresh_ensemble.wait_quorum()
            count = len(renewed)
            wait_for("renewals under the new leader", lambda: len(renewed) >= count + 2, 10)
            assert not keeper.lost
        finally:
            lease = keeper.stop()
        assert backend.finish_and_release(run, lease, 1, Outcome(SUCCEEDED))
        assert [a.state for a in backend.attempts(run.run_id)] == [SUCCEEDED]
        assert acquire(backend, "failover").token > lease.token


@pytest.mark.server
def test_without_a_quorum_no_lock_is_granted_and_with_it_back_tokens_still_rise(
    fresh_ensemble: ZookeeperEnsemble,
) -> None:
    first, second, _ = fresh_ensemble.members
    with opened(fresh_ensemble.url(), session_timeout=6) as backend:
        first.kill()
        before = eventually(backend, "quorum", "a lock with two members of three", 20)
        backend.release(before)
        second.kill()

        def refused() -> bool:
            try:
                lease = backend.try_acquire("quorum", 30, new_owner("b"))
            except BackendUnavailable:
                return True
            assert lease is None, f"a lock was granted without a quorum: token {lease.token}"
            return False

        wait_for("acquisition to be refused without quorum", refused, timeout=15)
        second.start()
        after = eventually(backend, "quorum", "a lock once the quorum is back", 30)
    assert after.token > before.token


def test_server_time_is_the_leaders_clock(tmp_path: Path) -> None:
    """The skew check's reference on ZooKeeper: the ``mtime`` the leader stamps on a write,
    here from a server whose wall clock is an hour ahead of ours (libfaketime)."""
    from tests.servers.zookeeper import standalone  # a plugin: imported by pytest first

    with standalone(tmp_path / "zk", skewed("+1h")) as server, opened(server.url()) as backend:
        server_time = backend.server_time()
    assert server_time is not None
    assert abs((server_time - datetime.now(UTC)).total_seconds() - 3600) < 1.0
