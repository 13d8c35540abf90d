"""What the etcd backend promises beyond the shared contract, against real etcd processes:
a single node, and a three-member cluster on one host. Faults are real (SIGSTOP, SIGKILL,
restarts, an operator's etcdctl); waits are bounded and driven from what etcd shows."""

from __future__ import annotations

import base64
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from singleton.backends.base import RUNNING, SUCCEEDED, Lease, Outcome, new_owner
from singleton.backends.etcd import EtcdBackend, parse_url
from singleton.clock import SYSTEM_CLOCK
from singleton.errors import BackendUnavailable, ConfigError, LeaseLost, StaleToken
from singleton.fencing.sqlite import fence
from singleton.lease import LeaseKeeper
from singleton.testing.contract import make_run
from tests.replicas import ROOT, wait_for
from tests.servers import free_port
from tests.servers.etcd import EtcdCluster, etcd_cluster

pytestmark = pytest.mark.server


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One node for the tests that do not hurt it."""
    with etcd_cluster(tmp_path_factory.mktemp("etcd")) as cluster:
        yield cluster


@pytest.fixture
def node(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A node of the test's own, for the tests that pause, restart or reconfigure it."""
    with etcd_cluster(tmp_path / "etcd") as cluster:
        yield cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path / "etcd", size=3) as three:
        yield three


@pytest.fixture
def name() -> str:
    return f"job-{time.monotonic_ns()}"


@pytest.fixture
def opened() -> Iterator[list[EtcdBackend]]:
    """Backends a test opened, closed at its end."""
    backends: list[EtcdBackend] = []
    yield backends
    for backend in backends:
        backend.close()


def open_etcd(opened: list[EtcdBackend], url: str) -> EtcdBackend:
    backend = EtcdBackend(url)
    opened.append(backend)
    return backend


def acquire(backend: EtcdBackend, name: str, ttl: float = 5.0) -> Lease:
    lease = backend.try_acquire(name, ttl, new_owner("test"))
    assert lease is not None, f"{name} should have been free"
    return lease


def raw(etcd: EtcdCluster, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A request straight to the gateway, to look at what the backend left in etcd."""
    reply = httpx.post(f"http://{etcd.members[0].address}{path}", json=body, timeout=5)
    result: dict[str, Any] = reply.json()
    return result


def keys_under(etcd: EtcdCluster, prefix: str) -> list[dict[str, Any]]:
    start = prefix.encode()
    end = start[:-1] + bytes([start[-1] + 1])
    reply = raw(
        etcd,
        "/v3/kv/range",
        {"key": base64.b64encode(start).decode(), "range_end": base64.b64encode(end).decode()},
    )
    return list(reply.get("kvs", []))


def sink_write(sink: Path, token: int, run_id: str) -> None:
    """A write to a resource that the SQLite fencing guard protects."""
    conn = sqlite3.connect(sink)
    try:
        with conn:
            fence(conn, "sink", token, run_id)
    finally:
        conn.close()


# -- configuration ------------------------------------------------------------------------------


def test_url_names_members_prefix_and_credentials() -> None:
    settings = parse_url("etcd://root:p%40ss@h1:2379,h2,[::1]:2381/apps/singleton/")
    assert settings.endpoints == ("h1:2379", "h2:2379", "[::1]:2381")
    assert settings.prefix == "/apps/singleton"
    assert (settings.user, settings.password, settings.tls) == ("root", "p@ss", False)


def test_url_without_a_prefix_uses_the_default() -> None:
    assert parse_url("etcd://h1").prefix == "/singleton"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("etcd://root:hunter2@h1:notaport/p", "bad member address"),
        ("etcd://root:hunter2@h1,,h2/p", "bad member address"),
        ("etcd://root:hunter2@h1/p?tls=maybe", "want true or false"),
        ("etcd://root:hunter2@h1/p?cafile=/x", "unknown option 'cafile'"),
        ("etcd://root:hunter2@h1/p?ca_file=/no/such/ca.pem", "not a readable file"),
        ("etcd://:hunter2@h1/p", "needs a user name"),
    ],
)
def test_url_mistakes_are_one_config_error_without_the_password(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as error:
        parse_url(url)
    assert "hunter2" not in str(error.value)


def test_unreachable_members_are_backend_unavailable(opened: list[EtcdBackend]) -> None:
    backend = open_etcd(opened, f"etcd://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/p")
    with pytest.raises(BackendUnavailable, match="unreachable"):
        backend.try_acquire("job", 5, new_owner("test"))


# -- the lock on etcd ---------------------------------------------------------------------------


def test_token_is_the_lock_keys_create_revision(
    shared: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    lease = acquire(open_etcd(opened, shared.url("/tokens")), name)
    (key,) = keys_under(shared, f"/tokens/locks/{name}/")
    assert int(key["create_revision"]) == lease.token


def test_ttl_is_granted_in_whole_seconds_but_the_deadline_keeps_the_ttl_asked(
    shared: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    backend = open_etcd(opened, shared.url("/ttl"))
    before = time.monotonic()
    lease = acquire(backend, name, ttl=2.5)
    (key,) = keys_under(shared, f"/ttl/locks/{name}/")
    granted = raw(shared, "/v3/lease/timetolive", {"ID": key["lease"]})["grantedTTL"]
    assert granted == "3"
    assert lease.deadline < before + 2.5


def test_a_busy_lock_leaves_no_key_behind(
    shared: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    url = shared.url("/busy")
    acquire(open_etcd(opened, url), name)
    assert open_etcd(opened, url).try_acquire(name, 5, new_owner("b")) is None
    assert len(keys_under(shared, f"/busy/locks/{name}/")) == 1
    assert keys_under(shared, f"/busy/waiters/{name}/") == []


def test_one_release_wakes_one_waiter(
    shared: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    url = shared.url("/queue")
    lease = acquire(open_etcd(opened, url), name)
    waiters = [open_etcd(opened, url) for _ in range(3)]
    woke: queue.Queue[EtcdBackend] = queue.Queue()

    def stand_by(side: EtcdBackend) -> None:
        side.wait(name, 20.0)
        woke.put(side)

    for side in waiters:
        threading.Thread(target=stand_by, args=(side,), daemon=True).start()
    wait_for(
        "three queued waiters",
        lambda: len(keys_under(shared, f"/queue/waiters/{name}/")) == 3,
        timeout=5,
    )
    holder: EtcdBackend = opened[0]
    for _ in waiters:
        holder.release(lease)
        holder = woke.get(timeout=3)
        time.sleep(0.6)  # a quiet spell: a second waiter woken by this release would show now
        assert woke.empty(), "one release woke more than one waiter"
        lease = acquire(holder, name)
    holder.release(lease)


def test_renew_after_an_operator_revokes_the_lease_raises_lease_lost(
    shared: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    backend = open_etcd(opened, shared.url("/revoked"))
    lease = acquire(backend, name)
    (key,) = keys_under(shared, f"/revoked/locks/{name}/")
    shared.etcdctl("lease", "revoke", f"{int(key['lease']):x}")
    with pytest.raises(LeaseLost):
        backend.renew(lease)


def stale_owner(url: str, name: str, sink: str) -> None:
    """Run in a child process: acquire, claim and keep the lease renewed; report the token;
    then, once told (after the test stopped and resumed this process), report whether the
    keeper saw the lease go, and try the late writes anyway, as a zombie owner would."""

    def say(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    backend = EtcdBackend(url)
    run = make_run(name)
    got = backend.acquire_and_claim(run, 2.0, new_owner("stale"))
    assert got is not None
    lease, lost = got[0], threading.Event()
    keeper = LeaseKeeper(backend, lease, SYSTEM_CLOCK, on_lost=lambda reason: lost.set()).start()
    say(f"acquired {lease.token}")
    sys.stdin.readline()
    say(f"lost {lost.wait(5.0)}")
    keeper.stop()
    say(f"finish {backend.finish(run, lease, 1, Outcome(SUCCEEDED))}")
    try:
        sink_write(Path(sink), lease.token, run.run_id)
        say("write applied")
    except StaleToken:
        say("write refused")
    backend.close()


def test_sigstopped_owner_is_taken_over_and_its_late_writes_are_refused(
    shared: EtcdCluster, opened: list[EtcdBackend], name: str, tmp_path: Path
) -> None:
    url, sink, run = shared.url("/stopped"), tmp_path / "sink.db", make_run(name)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; from {__name__} import stale_owner; stale_owner(*sys.argv[1:])",
            url,
            name,
            str(sink),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        stale_token = int(child.stdout.readline().split()[1])
        child.send_signal(signal.SIGSTOP)
        successor = open_etcd(opened, url)
        deadline = time.monotonic() + 2.0 + 3.0
        while (lease := successor.try_acquire(name, 5, new_owner("next"))) is None:
            assert time.monotonic() < deadline, "the stopped owner's lease never ended"
            successor.wait(name, 1.0)
        assert lease.token > stale_token
        found = successor.claim(run, lease)
        assert found.latest is not None and found.latest.state == RUNNING
        assert successor.claim(run, lease, seen=1).attempt is not None
        sink_write(sink, lease.token, run.run_id)
        child.send_signal(signal.SIGCONT)
        out, _ = child.communicate("go\n", timeout=10)
    finally:
        child.send_signal(signal.SIGCONT)
        child.kill()
        child.wait()
    assert out.split("\n")[:3] == ["lost True", "finish False", "write refused"]


def test_keepalive_failing_past_the_deadline_loses_the_lease(
    node: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    backend = EtcdBackend(node.url("/paused"), timeout=0.3)
    opened.append(backend)
    lease = acquire(backend, name, ttl=2.0)
    lost = threading.Event()
    failures: list[str] = []
    keeper = LeaseKeeper(
        backend,
        lease,
        SYSTEM_CLOCK,
        on_lost=lambda reason: lost.set(),
        on_renewal_failed=failures.append,
    ).start()
    node.members[0].pause()
    try:
        assert lost.wait(2.0 + 1.0), "the keeper kept a lease it could not renew"
        assert failures and all("BackendUnavailable" in failure for failure in failures)
        assert time.monotonic() >= keeper.lease.deadline
    finally:
        node.members[0].resume()
        keeper.stop()


def test_a_token_regression_after_a_restore_is_repaired_by_evict(
    node: EtcdCluster, opened: list[EtcdBackend], name: str, tmp_path: Path
) -> None:
    member, url = node.members[0], node.url("/restore")
    backend = open_etcd(opened, url)
    backend.release(acquire(backend, name))
    member.stop()
    shutil.copytree(member.data_dir, tmp_path / "snapshot")
    member.start()
    node.wait_healthy()
    for _ in range(3):
        backend.release(acquire(backend, name))
    highest = acquire(backend, name).token
    member.stop()
    shutil.rmtree(member.data_dir)
    shutil.copytree(tmp_path / "snapshot", member.data_dir)
    member.start()
    node.wait_healthy()
    restored = open_etcd(opened, url)
    regressed = acquire(restored, name)
    assert regressed.token <= highest
    restored.evict(name, highest)
    assert acquire(restored, name).token > highest


def test_the_highest_recorded_token_outlives_pruning(
    shared: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    backend = open_etcd(opened, shared.url("/highest"))
    old = make_run(name, datetime(2026, 1, 1, tzinfo=UTC))
    got = backend.acquire_and_claim(old, 5, new_owner("a"))
    assert got is not None
    backend.finish_and_release(old, got[0], 1, Outcome(SUCCEEDED))
    assert backend.prune(datetime(2027, 1, 1, tzinfo=UTC), keep=0) == 1
    again = backend.acquire_and_claim(make_run(name), 5, new_owner("b"))
    assert again is not None and again[1].highest == got[0].token


# -- authentication -----------------------------------------------------------------------------


@pytest.fixture
def with_auth(node: EtcdCluster) -> EtcdCluster:
    node.etcdctl("user", "add", "root", "--new-user-password=s3cret", "--interactive=false")
    node.etcdctl("auth", "enable")
    return node


def test_user_and_password_in_the_url_authenticate(
    with_auth: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    backend = open_etcd(opened, with_auth.url("/auth", credentials="root:s3cret"))
    lease = acquire(backend, name)
    claim = backend.claim(make_run(name), lease)
    assert claim.attempt is not None and claim.attempt.token == lease.token


def test_a_wrong_password_is_one_config_error_without_the_secret(with_auth: EtcdCluster) -> None:
    with pytest.raises(ConfigError, match="wrong user name or password") as error:
        EtcdBackend(with_auth.url("/auth", credentials="root:not-s3cret"))
    assert "not-s3cret" not in str(error.value)
    assert "\n" not in str(error.value)


def test_no_credentials_on_a_cluster_with_auth_is_a_config_error(
    with_auth: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    backend = open_etcd(opened, with_auth.url("/auth"))
    with pytest.raises(ConfigError, match="requires authentication"):
        backend.try_acquire(name, 5, new_owner("test"))


# -- TLS ----------------------------------------------------------------------------------------


@pytest.fixture
def with_tls(tmp_path: Path) -> Iterator[EtcdCluster]:
    with etcd_cluster(tmp_path / "etcd", tls=True) as cluster:
        yield cluster


def test_tls_with_the_clusters_ca_in_the_url(
    with_tls: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    certificates = with_tls.members[0].tls
    assert certificates is not None
    backend = open_etcd(opened, with_tls.url(f"/tls?ca_file={certificates.ca}"))
    lease = acquire(backend, name)
    assert backend.renew(lease).token == lease.token


def test_tls_with_an_untrusted_certificate_is_refused(
    with_tls: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    backend = open_etcd(opened, with_tls.url("/tls?tls=true"))
    with pytest.raises(BackendUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
        backend.try_acquire(name, 5, new_owner("test"))


# -- a three-member cluster ---------------------------------------------------------------------


def test_killing_the_member_in_use_moves_the_client_to_another(
    cluster: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    first, *others = cluster.followers()
    backend = open_etcd(
        opened, cluster.url("/failover", members=[first, *others, cluster.leader()])
    )
    lease = acquire(backend, name)
    assert backend.endpoint == first.address
    first.kill()
    renewed = backend.renew(lease)
    assert backend.endpoint != first.address
    holder = backend.holder(name)
    assert holder is not None and holder.token == renewed.token == lease.token


def test_leader_failover_keeps_a_renewed_lease(
    cluster: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    backend = open_etcd(opened, cluster.url("/leader"))
    lease = acquire(backend, name, ttl=6.0)
    lost = threading.Event()
    keeper = LeaseKeeper(backend, lease, SYSTEM_CLOCK, on_lost=lambda reason: lost.set()).start()
    try:
        old = cluster.leader()
        old.kill()
        cluster.wait_healthy()
        assert cluster.leader() is not old
        renewed = wait_for(
            "a renewal through the new leader",
            lambda: keeper.lease if keeper.lease.deadline > lease.deadline else None,
            timeout=6.0,
        )
        assert not lost.is_set()
        holder = backend.holder(name)
        assert holder is not None and holder.token == renewed.token
    finally:
        keeper.stop()


def test_a_lease_outliving_its_ttl_after_a_leader_change_is_still_fenced(
    cluster: EtcdCluster, opened: list[EtcdBackend], name: str, tmp_path: Path
) -> None:
    url, sink, run = cluster.url("/outlived"), tmp_path / "sink.db", make_run(name)
    stale_side, next_side = open_etcd(opened, url), open_etcd(opened, url)
    sent = time.monotonic()
    got = stale_side.acquire_and_claim(run, 3.0, new_owner("stale"))
    assert got is not None
    stale = got[0]  # never renewed from here on: its owner is as good as paused
    cluster.leader().kill()
    cluster.wait_healthy()
    while (lease := next_side.try_acquire(name, 5, new_owner("next"))) is None:
        assert time.monotonic() < sent + 15, "the stale lease never ended"
        next_side.wait(name, 1.0)
    lived = time.monotonic() - sent
    assert lived > 3.0 + 0.5, "etcd did not restart the lease's countdown at the leader change"
    assert lease.token > stale.token
    assert next_side.claim(run, lease, seen=1).attempt is not None
    sink_write(sink, lease.token, run.run_id)
    with pytest.raises(LeaseLost):
        stale_side.claim(run, stale, seen=1)
    assert not stale_side.finish(run, stale, 1, Outcome(SUCCEEDED))
    with pytest.raises(StaleToken):
        sink_write(sink, stale.token, run.run_id)


def test_without_quorum_nothing_starts_and_tokens_still_increase_after_recovery(
    cluster: EtcdCluster, opened: list[EtcdBackend], name: str
) -> None:
    backend = EtcdBackend(cluster.url("/quorum"), timeout=0.5)
    opened.append(backend)
    before = acquire(backend, name)
    backend.release(before)
    gone = cluster.members[1:]
    for member in gone:
        member.kill()
    run = make_run(name)
    with pytest.raises(BackendUnavailable):
        backend.acquire_and_claim(run, 5, new_owner("test"))
    for member in gone:
        member.start()
    cluster.wait_healthy()
    got = backend.acquire_and_claim(run, 5, new_owner("test"))
    assert got is not None and got[0].token > before.token
    assert [attempt.attempt for attempt in backend.attempts(run.run_id)] == [1]
