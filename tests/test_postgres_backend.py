"""What the PostgreSQL backend promises beyond the shared contract, against real servers:
tokens that outlive the database process, leases that ride out a short outage and are given
up on time in a long one, renewals that a stalled database cannot hold past the deadline,
cut connections replaced before use, contention without deadlocks, standbys woken by
NOTIFY one at a time in the order they came, a schema that many replicas can create at once
and that an older version's schema is upgraded to, and one-line errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from singleton.backends import open_backend
from singleton.backends.base import Lease, Outcome, Run, new_owner
from singleton.backends.postgres import SCHEMA_VERSION, PostgresBackend, migrate
from singleton.clock import SYSTEM_CLOCK
from singleton.errors import BackendUnavailable, ConfigError, LeaseLost
from singleton.lease import LeaseKeeper
from tests.replicas import FAKETIME, wait_for
from tests.servers.postgres import PostgresServer, fresh_server, shared_server

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with shared_server() as server:
        yield server


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.create_database()


@pytest.fixture(scope="module")
def own_server() -> Iterator[PostgresServer]:
    with fresh_server() as server:
        yield server


@pytest.fixture
def disruptable(own_server: PostgresServer) -> Iterator[PostgresServer]:
    """A server this module's tests may stop, restart and pause; healed after each."""
    yield own_server
    own_server.heal()


@pytest.fixture
def backends() -> Iterator[list[PostgresBackend]]:
    """Backends a test opens, closed after it whatever happened."""
    opened: list[PostgresBackend] = []
    yield opened
    for backend in opened:
        backend.close()


def open_pg(opened: list[PostgresBackend], url: str, **options: Any) -> PostgresBackend:
    backend = PostgresBackend(url, **options)
    opened.append(backend)
    return backend


def acquire(backend: PostgresBackend, name: str, ttl: float) -> Lease:
    lease = backend.try_acquire(name, ttl, new_owner("test"))
    assert lease is not None
    return lease


@dataclass
class Kept:
    """A lease under a real LeaseKeeper, with what happened to it and when."""

    keeper: LeaseKeeper
    renewed: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lost: list[tuple[float, str]] = field(default_factory=list)


Keep = Callable[[PostgresBackend, Lease], Kept]


@pytest.fixture
def keep() -> Iterator[Keep]:
    """Starts LeaseKeepers that record renewals, failures and the loss; stops them after."""
    started: list[Kept] = []

    def start(backend: PostgresBackend, lease: Lease) -> Kept:
        kept: Kept
        keeper = LeaseKeeper(
            backend,
            lease,
            SYSTEM_CLOCK,
            on_lost=lambda reason: kept.lost.append((time.monotonic(), reason)),
            on_renewal_failed=lambda error: kept.failures.append(error),
            on_renewed=lambda lease: kept.renewed.append(time.monotonic()),
        )
        kept = Kept(keeper)
        started.append(kept)
        keeper.start()
        return kept

    yield start
    for kept in started:
        kept.keeper.stop()


def application(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


# -- durability and outages -----------------------------------------------------------------


def test_tokens_survive_a_restart_of_the_database(
    disruptable: PostgresServer, backends: list[PostgresBackend]
) -> None:
    backend = open_pg(backends, disruptable.create_database())
    first = acquire(backend, "job", 5.0)
    backend.release(first)
    disruptable.restart()
    assert acquire(backend, "job", 5.0).token > first.token


def test_a_restart_within_the_ttl_keeps_the_lease(
    disruptable: PostgresServer, backends: list[PostgresBackend], keep: Keep
) -> None:
    backend = open_pg(backends, disruptable.create_database(), timeout=1.0)
    kept = keep(backend, acquire(backend, "job", 4.0))
    disruptable.stop()
    wait_for("a failed renewal", lambda: kept.failures, timeout=4)
    disruptable.start()
    back = time.monotonic()
    wait_for("a renewal after the restart", lambda: [t for t in kept.renewed if t > back], 4)
    assert not kept.lost
    holder = backend.holder("job")
    assert holder is not None and holder.token == kept.keeper.lease.token


def test_an_outage_longer_than_the_ttl_loses_the_lease_by_its_deadline(
    disruptable: PostgresServer, backends: list[PostgresBackend], keep: Keep
) -> None:
    url = disruptable.create_database()
    backend = open_pg(backends, url, timeout=1.0)
    kept = keep(backend, acquire(backend, "job", 1.5))
    disruptable.stop()
    wait_for("the lease to be lost", lambda: kept.lost, timeout=5)
    lost_at, reason = kept.lost[0]
    assert lost_at - kept.keeper.lease.deadline < 0.25, reason
    disruptable.start()
    successor = acquire(open_pg(backends, url), "job", 5.0)
    assert successor.token > kept.keeper.lease.token
    with pytest.raises(LeaseLost):
        backend.renew(kept.keeper.lease)


def test_a_renewal_to_a_paused_database_gives_up_at_the_lease_deadline(
    disruptable: PostgresServer, backends: list[PostgresBackend]
) -> None:
    backend = open_pg(backends, disruptable.create_database(), timeout=30.0)
    lease = acquire(backend, "job", 1.0)
    disruptable.pause()
    with pytest.raises(BackendUnavailable, match="no answer within"):
        backend.renew(lease)
    assert time.monotonic() - lease.deadline < 0.1


def test_a_paused_database_cannot_hold_a_new_connection_past_the_timeout(
    disruptable: PostgresServer, backends: list[PostgresBackend]
) -> None:
    backend = open_pg(backends, disruptable.create_database(), timeout=0.5)
    lease = acquire(backend, "job", 10.0)
    disruptable.pause()
    with pytest.raises(BackendUnavailable, match="no answer within"):
        backend.renew(lease)  # its connection is cut, so the next renewal must connect
    started = time.monotonic()
    with pytest.raises(BackendUnavailable):
        backend.renew(lease)
    assert time.monotonic() - started < 0.5 + 0.1
    disruptable.resume()
    assert backend.renew(lease).token == lease.token


def test_a_connection_cut_by_pg_terminate_backend_is_replaced_and_the_lease_kept(
    postgres: PostgresServer, url: str, backends: list[PostgresBackend], keep: Keep
) -> None:
    name = application("cut")
    backend = open_pg(backends, f"{url}?application_name={name}")
    kept = keep(backend, acquire(backend, "job", 1.5))
    postgres.terminate(name)
    cut = time.monotonic()
    wait_for("a renewal on a new connection", lambda: [t for t in kept.renewed if t > cut], 2)
    assert not kept.lost
    assert not kept.failures, "a dead pooled connection was used"


# -- contention -----------------------------------------------------------------------------


def test_thirty_contenders_elect_exactly_one_owner_per_round(
    url: str, backends: list[PostgresBackend]
) -> None:
    contenders = [open_pg(backends, url) for _ in range(30)]
    rounds = 10
    winners: list[list[int]] = [[] for _ in range(rounds)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(contenders), timeout=60)

    def contend(index: int, backend: PostgresBackend) -> None:
        try:
            for number in range(rounds):
                run = Run("contested", f"contested@{number}", datetime(2026, 1, 1, tzinfo=UTC))
                barrier.wait()
                got = backend.acquire_and_claim(run, 30.0, new_owner(f"c{index}"))
                barrier.wait()  # everyone has tried while the winner holds the lock
                if got is not None:
                    winners[number].append(index)
                    lease, claim = got
                    assert claim.attempt is not None
                    backend.finish_and_release(
                        run, lease, claim.attempt.attempt, Outcome("succeeded")
                    )
                barrier.wait()
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=contend, args=(i, b)) for i, b in enumerate(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[0]
    assert [len(w) for w in winners] == [1] * rounds
    history = contenders[0].history("contested", 0)
    assert sorted(a.run_id for a in history) == sorted(f"contested@{n}" for n in range(rounds))
    assert {a.state for a in history} == {"succeeded"}


# -- standby --------------------------------------------------------------------------------


def test_a_standby_is_woken_by_the_release_itself(
    url: str, backends: list[PostgresBackend]
) -> None:
    owner, standby = open_pg(backends, url), open_pg(backends, url)
    lease = acquire(owner, "job", 30.0)
    threading.Timer(1.0, owner.release, (lease,)).start()
    started = time.monotonic()
    standby.wait("job", 10.0)
    assert 0.9 <= time.monotonic() - started < 1.25


def test_a_standby_is_woken_when_the_owner_finishes_and_releases(
    url: str, backends: list[PostgresBackend]
) -> None:
    owner, standby = open_pg(backends, url), open_pg(backends, url)
    run = Run("job", "job@1", datetime(2026, 1, 1, tzinfo=UTC))
    got = owner.acquire_and_claim(run, 30.0, new_owner("owner"))
    assert got is not None
    finish = (run, got[0], 1, Outcome("succeeded"))
    threading.Timer(1.0, owner.finish_and_release, finish).start()
    started = time.monotonic()
    standby.wait("job", 10.0)
    assert 0.9 <= time.monotonic() - started < 1.25


def test_a_standby_wakes_when_the_lease_runs_out_unreleased(
    url: str, backends: list[PostgresBackend]
) -> None:
    owner, standby = open_pg(backends, url), open_pg(backends, url)
    acquire(owner, "job", 1.0)
    started = time.monotonic()
    standby.wait("job", 10.0)
    assert 0.9 <= time.monotonic() - started < 1.25
    assert standby.holder("job") is None


def test_a_standby_still_sees_a_release_after_its_listening_connection_was_cut(
    postgres: PostgresServer, url: str, backends: list[PostgresBackend]
) -> None:
    name = application("listener")
    owner, standby = open_pg(backends, url), open_pg(backends, f"{url}?application_name={name}")
    lease = acquire(owner, "job", 30.0)
    standby.wait("free", 1.0)  # starts the listener
    postgres.terminate(name)
    owner.release(lease)
    released = time.monotonic()
    while standby.holder("job") is not None:
        standby.wait("job", 10.0)
    assert time.monotonic() - released < 0.5


def in_line(url: str, name: str) -> int:
    """How many standbys are in line for ``name``, as the database sees it."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM singleton.waiters WHERE name = %s", (name,)
        ).fetchone()
    return int(row[0]) if row else 0


@dataclass
class Standbys:
    """Threads that each wait once for a lock, long, and note the order they returned in."""

    url: str
    returned: list[int] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, backend: PostgresBackend, name: str, timeout: float = 20.0) -> None:
        """One more standby, started once the previous ones are in line (so the order they
        got in line is the order they were added)."""
        index = len(self.threads)

        def stand_by() -> None:
            backend.wait(name, timeout)
            with self.lock:
                self.returned.append(index)

        thread = threading.Thread(target=stand_by, daemon=True)
        self.threads.append(thread)
        thread.start()
        wait_for(f"standby {index} in line", lambda: in_line(self.url, name) == index + 1, 5)

    def count(self) -> int:
        with self.lock:
            return len(self.returned)

    def await_returned(self, count: int, timeout: float) -> None:
        wait_for(f"{count} standbys to return", lambda: self.count() >= count, timeout)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(5)


def two_processes_of_three_standbys(
    url: str, backends: list[PostgresBackend], name: str
) -> Standbys:
    """Six standbys: three threads in each of two backend objects (two LISTEN connections,
    as two replica processes have), taking turns to get in line."""
    first, second = open_pg(backends, url), open_pg(backends, url)
    standbys = Standbys(url)
    for _ in range(3):
        standbys.add(first, name)
        standbys.add(second, name)
    return standbys


def test_each_release_wakes_one_standby_of_many_in_two_processes(
    url: str, backends: list[PostgresBackend]
) -> None:
    owner = open_pg(backends, url)
    lease = acquire(owner, "job", 30.0)
    standbys = two_processes_of_three_standbys(url, backends, "job")
    woken_per_release = []
    for released in range(1, 7):
        owner.release(lease)
        standbys.await_returned(released, 2)
        time.sleep(0.3)  # room for any other standby to wake by mistake
        woken_per_release.append(standbys.count() - released + 1)
        lease = acquire(owner, "job", 30.0)
    standbys.join()
    assert woken_per_release == [1] * 6


def test_a_release_wakes_the_standby_that_has_waited_longest(
    url: str, backends: list[PostgresBackend]
) -> None:
    owner = open_pg(backends, url)
    lease = acquire(owner, "job", 30.0)
    standbys = two_processes_of_three_standbys(url, backends, "job")
    for released in range(1, 7):
        owner.release(lease)
        standbys.await_returned(released, 2)
        lease = acquire(owner, "job", 30.0)
    standbys.join()
    assert standbys.returned == list(range(6))


def test_an_unreleased_lease_running_out_wakes_only_the_first_standby(
    url: str, backends: list[PostgresBackend]
) -> None:
    owner = open_pg(backends, url)
    acquire(owner, "job", 1.5)
    standbys = two_processes_of_three_standbys(url, backends, "job")
    wait_for("the first standby to wake at the lease's expiry", standbys.count, 3)
    time.sleep(0.5)
    assert standbys.returned == [0]


DIES_IN_LINE = """
import sys
from singleton.backends.postgres import PostgresBackend
PostgresBackend(sys.argv[1]).wait("job", 60.0)
"""


def test_a_standby_behind_one_that_died_in_line_gets_the_lock_within_its_wait(
    url: str, backends: list[PostgresBackend]
) -> None:
    owner, standby = open_pg(backends, url), open_pg(backends, url)
    lease = acquire(owner, "job", 30.0)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    dead = subprocess.Popen([sys.executable, "-c", DIES_IN_LINE, url], env=env)
    try:
        wait_for("the doomed standby in line", lambda: in_line(url, "job") == 1, 10)
    finally:
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait(10)
    # Its row stays (it expires with its 60 s wait); the release's NOTIFY goes to it and is
    # lost. The live standby behind it must not wait for anything but its own timeout.
    pause = 1.0
    got: list[tuple[float, Lease | None]] = []

    def stand_by() -> None:
        while (taken := standby.try_acquire("job", 30.0, new_owner("live"))) is None:
            standby.wait("job", pause)
        got.append((time.monotonic(), taken))

    thread = threading.Thread(target=stand_by, daemon=True)
    thread.start()
    wait_for("the live standby in line", lambda: in_line(url, "job") == 2, 5)
    owner.release(lease)
    released = time.monotonic()
    assert in_line(url, "job") == 1, "the release did not pick the dead standby"
    thread.join(pause + 2)
    assert got, "the live standby never got the lock"
    taken_at, taken = got[0]
    assert taken is not None and taken.token > lease.token
    assert taken_at - released < pause + 0.25


def test_closing_a_backend_leaves_no_connection_behind(postgres: PostgresServer, url: str) -> None:
    name = application("closed")
    backend = PostgresBackend(f"{url}?application_name={name}")
    backend.wait("free", 1.0)  # starts the listener
    assert postgres.sessions(name) == 2  # the pool's and the listener's
    backend.close()
    wait_for("the connections to close", lambda: postgres.sessions(name) == 0, timeout=2)


# -- schema ---------------------------------------------------------------------------------

CREATE_AT_ONCE = """
import sys
from singleton.backends.postgres import PostgresBackend
print("ready", flush=True)
sys.stdin.readline()
backend = PostgresBackend(sys.argv[1], schema=sys.argv[2])
backend.close()
"""


def test_migrate_creates_the_schema_and_then_finds_it_current(url: str) -> None:
    assert migrate(url, schema="migrated").endswith(f"created at version {SCHEMA_VERSION}")
    assert migrate(url, schema="migrated").endswith(f"already at version {SCHEMA_VERSION}")


def test_first_use_creates_the_line_of_standbys(url: str, backends: list[PostgresBackend]) -> None:
    open_pg(backends, url)
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT to_regclass('singleton.waiters') IS NOT NULL,"
            " to_regprocedure('singleton.wake_next(text)') IS NOT NULL"
        ).fetchone()
    assert found == (True, True)


def as_version_2(url: str) -> None:
    """Take a current schema back to what version 2 created: no line of standbys."""
    with psycopg.connect(url) as conn:
        conn.execute("DROP FUNCTION singleton.wake_next(text)")
        conn.execute("DROP TABLE singleton.waiters")
        conn.execute("DELETE FROM singleton.schema_version WHERE version > 2")
        conn.execute("INSERT INTO singleton.schema_version (version) VALUES (2)")


def test_migrate_upgrades_a_version_2_schema_and_keeps_its_locks(
    url: str, backends: list[PostgresBackend]
) -> None:
    assert SCHEMA_VERSION == 3
    migrate(url)
    first = acquire(open_pg(backends, url), "job", 30.0)
    as_version_2(url)
    assert migrate(url).endswith("upgraded from version 2 to 3")
    owner, standby = open_pg(backends, url), open_pg(backends, url)
    assert owner.found_version == 3
    assert owner.holder("job") is not None  # the lock table was kept
    owner.evict("job")
    lease = acquire(owner, "job", 30.0)
    assert lease.token > first.token
    threading.Timer(1.0, owner.release, (lease,)).start()
    started = time.monotonic()
    standby.wait("job", 10.0)
    assert 0.9 <= time.monotonic() - started < 1.25


def test_a_replica_upgrades_a_version_2_schema_at_start(
    url: str, backends: list[PostgresBackend]
) -> None:
    migrate(url)
    as_version_2(url)
    assert open_pg(backends, url).found_version == 2
    with psycopg.connect(url) as conn:
        versions = conn.execute("SELECT version FROM singleton.schema_version").fetchall()
        found = conn.execute("SELECT to_regclass('singleton.waiters') IS NOT NULL").fetchone()
    assert sorted(versions) == [(2,), (3,)]
    assert found == (True,)


def test_migrate_refuses_other_backends(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="migrate is for postgresql://"):
        migrate(f"sqlite:///{tmp_path / 'state.db'}")


def test_the_migrate_command_creates_the_configured_schema(url: str, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"backend:\n  url: {url}\n  schema: by_command\njobs: {{}}\n")
    command = [sys.executable, "-m", "singleton", "migrate", str(config)]
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"created at version {SCHEMA_VERSION}")
    assert "schema by_command" in done.stdout
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT to_regclass('by_command.waiters') IS NOT NULL").fetchone()
    assert found == (True,)


def test_replicas_creating_the_schema_at_once_all_start(url: str) -> None:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", CREATE_AT_ONCE, url, "together"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(6)
    ]
    for starter in starters:
        assert starter.stdout is not None and starter.stdout.readline() == "ready\n"
    for starter in starters:
        assert starter.stdin is not None
        starter.stdin.write("go\n")
        starter.stdin.flush()
    for starter in starters:
        _, err = starter.communicate(timeout=30)
        assert starter.returncode == 0, err
    with psycopg.connect(url) as conn:
        versions = conn.execute("SELECT version FROM together.schema_version").fetchall()
    assert versions == [(SCHEMA_VERSION,)]


def test_a_schema_newer_than_this_singleton_is_refused(url: str) -> None:
    migrate(url)
    with psycopg.connect(url) as conn:
        conn.execute("INSERT INTO singleton.schema_version (version) VALUES (%s)", (99,))
    with pytest.raises(ConfigError, match=r"version 99, newer .* upgrade singleton"):
        PostgresBackend(url)


def test_a_user_who_may_not_create_the_schema_is_told_to_migrate(
    postgres: PostgresServer, url: str
) -> None:
    role = f"r_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE ROLE {role} LOGIN")
    limited = url.replace("postgres@", f"{role}@")
    with pytest.raises(ConfigError, match="run 'singleton migrate CONFIG'"):
        PostgresBackend(limited)


def test_after_migrate_and_grants_a_user_without_create_rights_runs(
    postgres: PostgresServer, url: str, backends: list[PostgresBackend]
) -> None:
    role = f"r_{uuid.uuid4().hex[:8]}"
    postgres.sql(f"CREATE ROLE {role} LOGIN")
    migrate(url)
    dbname = url.rsplit("/", 1)[1]
    postgres.sql(
        f"GRANT USAGE ON SCHEMA singleton TO {role};"
        f" GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA singleton TO {role};"
        f" GRANT USAGE ON ALL SEQUENCES IN SCHEMA singleton TO {role}",
        dbname,
    )
    backend = open_pg(backends, url.replace("postgres@", f"{role}@"))
    run = Run("job", "job@1", datetime(2026, 1, 1, tzinfo=UTC))
    got = backend.acquire_and_claim(run, 5.0, new_owner("limited"))
    assert got is not None and got[1].attempt is not None
    assert backend.found_version == SCHEMA_VERSION


# -- configuration and errors ---------------------------------------------------------------


def test_the_schema_option_comes_from_the_config_through_open_backend(
    url: str, backends: list[PostgresBackend]
) -> None:
    backend = open_backend(url, schema="from_config")
    assert isinstance(backend, PostgresBackend)
    backends.append(backend)
    with psycopg.connect(url) as conn:
        found = conn.execute("SELECT to_regclass('from_config.locks') IS NOT NULL").fetchone()
    assert found == (True,)


def test_a_url_without_a_database_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="missing dbname"):
        PostgresBackend("postgresql://user:secret@127.0.0.1:5432")


def test_a_password_in_the_query_string_is_hidden_too() -> None:
    with pytest.raises(ConfigError) as caught:
        PostgresBackend("postgresql://user@127.0.0.1:5432?password=s3cret&sslmode=disable")
    assert "s3cret" not in str(caught.value) and "password=***" in str(caught.value)


def test_the_schema_in_the_url_is_a_config_error_that_says_where_it_goes(
    postgres: PostgresServer,
) -> None:
    with pytest.raises(ConfigError, match=r"invalid URI query parameter.*backend: section"):
        PostgresBackend(f"{postgres.url()}?schema=mine")


def test_a_schema_name_that_needs_quoting_is_a_config_error(postgres: PostgresServer) -> None:
    with pytest.raises(ConfigError, match=r"backend\.schema 'My-Schema'"):
        PostgresBackend(postgres.url(), schema="My-Schema")


def test_an_unknown_host_is_unavailable_in_one_line_without_the_password() -> None:
    with pytest.raises(BackendUnavailable) as caught:
        PostgresBackend("postgresql://user:s3cret@no-such-host.invalid/app", timeout=2.0)
    message = str(caught.value)
    assert "\n" not in message and "s3cret" not in message
    assert message.startswith("postgresql postgresql://user:***@no-such-host.invalid/app: ")


# -- clocks ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hour_ahead() -> Iterator[PostgresServer]:
    """A server whose wall clock is an hour ahead of ours (libfaketime)."""
    assert FAKETIME.exists(), "faketime is missing: run scripts/install-servers"
    skew = {"LD_PRELOAD": str(FAKETIME), "FAKETIME": "+1h", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    with fresh_server(skew) as server:
        yield server


def test_server_time_is_the_database_clock(
    hour_ahead: PostgresServer, backends: list[PostgresBackend]
) -> None:
    server_time = open_pg(backends, hour_ahead.url()).server_time()
    assert server_time is not None
    assert abs((server_time - datetime.now(UTC)).total_seconds() - 3600) < 1.0


def test_leases_are_timed_by_the_database_clock_alone(
    hour_ahead: PostgresServer, backends: list[PostgresBackend]
) -> None:
    backend = open_pg(backends, hour_ahead.url())
    acquire(backend, "skewed", 1.0)
    holder = backend.holder("skewed")
    assert holder is not None and holder.expires_in is not None
    assert 0.8 < holder.expires_in <= 1.0
    wait_for("the lease to expire", lambda: backend.holder("skewed") is None, timeout=2)
