"""``postgresql://user:pass@host:5432/db``: leases and the ledger in PostgreSQL, for teams that
run it already (``postgres://`` too). The tables live in one schema, the ``schema`` option
(default ``singleton``); every statement is in ``postgres.sql``.

Why these choices:

* A lock is a row: name, owner, token, ``expires_at`` on the **database's** clock
  (``clock_timestamp()``), so no replica's clock decides whether a lease has expired.
  Acquisition is one ``INSERT … ON CONFLICT … DO UPDATE … WHERE expired … RETURNING token``
  that bumps the token column; the row outlives its lease, so the counter survives release.
* Every operation is one statement in autocommit — the fused fast paths too, as CTEs — so it
  is one round trip, and the server never waits on a client inside a transaction: a replica
  that stalls mid-operation leaves no row lock behind. A claim locks its lease's row in the
  same statement, so a stale owner cannot write; a finish compares the attempt row's token
  and ``running`` state, not the lease (``overlap: allow`` releases the lock right after the
  claim), and a takeover marks that row abandoned.
* A renewal must return, or fail, before its lease's local deadline. TCP keepalives and
  ``tcp_user_timeout`` find a dead peer, but a stopped server's kernel still acknowledges our
  packets, and nothing at the TCP level ever fires. So every statement runs under a watchdog
  that shuts the socket down when its time is up (for a renewal: the lease's deadline), and
  connections are opened by a helper thread the caller waits on no longer than that, since
  libpq's ``connect_timeout`` cannot go below 2 s. ``statement_timeout`` makes the server
  give up as well.
* Connections come from a small pool, so a renewal never queues behind another thread's slow
  statement. Standbys are woken by ``LISTEN``/``NOTIFY`` on a connection and thread of their
  own, started by the first :meth:`~PostgresBackend.wait`; while it is down they poll.
* A release wakes one standby, not all of them: each wait gets in line in the ``waiters``
  table, and a release deletes the oldest live row of the lock and NOTIFYs that standby's
  process on a channel of its own, naming the wait. With 50 contenders, a broadcast woke
  every standby of every replica per release (17.5 wake-ups per release measured), and all
  but one went back to sleep. No wait depends on a NOTIFY: each is bounded by its timeout.
* Shared state (fleet fingerprints, operator switches) is the ``state`` table, keyed in the
  C collation so that a scan is one range of its primary key; a TTL is an ``expires_at`` on
  the database's clock, skipped by reads once past and deleted by ``prune``.
* The schema is created on first use, in one transaction under an advisory lock (replicas
  starting together take turns), or ahead of time by :func:`migrate` for teams that run
  migrations themselves. Its version is recorded, so a current schema costs one read.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import ConnStatus, TransactionStatus

from singleton.backends import open_backend
from singleton.backends.base import (
    SUCCEEDED,
    Attempt,
    Capabilities,
    Claim,
    Holder,
    Lease,
    Outcome,
    Run,
    lease_deadline,
    owner_replica,
)
from singleton.clock import SYSTEM_CLOCK, Clock
from singleton.durations import parse_duration
from singleton.errors import BackendError, BackendUnavailable, ConfigError, LeaseLost
from singleton.urls import redact, scheme

T = TypeVar("T")
Connection = psycopg.Connection[tuple[Any, ...]]

#: The version of the tables in ``postgres.sql``; raised with every change to them
#: (2: the ``state`` table; 3: the ``waiters`` table and ``wake_next``).
SCHEMA_VERSION = 3
#: Lower case (unquoted identifiers fold to it, so psql users find the schema by the name they
#: typed), and short enough that ``{schema}_`` and a listener's 12 hex digits fit a NOTIFY
#: channel (63 bytes).
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,47}")
#: How often a standby polls the lock row while its LISTEN connection is down.
_POLL = 0.25
#: How long the first wait gives the listener to be in place before it polls instead.
_LISTEN_START = 1.0


def _load_statements() -> dict[str, str]:
    text = resources.files("singleton.backends").joinpath("postgres.sql").read_text()
    parts = re.split(r"^-- name: (\w+)\n", text, flags=re.MULTILINE)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


_STATEMENTS = _load_statements()


def _shown(url: str) -> str:
    """``url`` fit for a message: :func:`~singleton.urls.redact` hides the password in the
    userinfo, and libpq also takes one as a query parameter."""
    return re.sub(r"([?&]password=)[^&]*", r"\1***", redact(url))


def _one_line(exc: BaseException) -> str:
    """libpq's messages span lines ("… failed: Connection refused\\n\\tIs the server …")."""
    return " ".join(str(exc).split()) or type(exc).__name__


def connection_params(url: str, timeout: float) -> dict[str, Any]:
    """libpq parameters for ``url``, with our timeouts wherever the URL sets none: a dead or
    partitioned server must show up as an error within about ``timeout`` seconds."""
    try:
        params: dict[str, Any] = conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"backend.url {_shown(url)!r}: {_one_line(exc)} (options of singleton's own, such"
            " as schema, go in the config's backend: section, not in the URL)"
        ) from None
    if not params.get("dbname"):
        raise ConfigError(
            f"backend.url {_shown(url)!r}: missing dbname (postgresql://user@host:5432/dbname)"
        )
    millis = max(1, round(timeout * 1000))
    server = (
        f"-c statement_timeout={millis} -c lock_timeout={millis}"
        f" -c idle_in_transaction_session_timeout={millis} -c TimeZone=UTC"
    )
    defaults = {
        "connect_timeout": max(2, math.ceil(timeout)),
        "keepalives": 1,
        "keepalives_idle": max(1, math.ceil(timeout / 2)),
        "keepalives_interval": 1,
        "keepalives_count": 3,
        "tcp_user_timeout": millis,
        "application_name": "singleton",
    }
    # Ours first: for a setting given twice the server keeps the last, the user's.
    params["options"] = f"{server} {params.get('options', '')}".strip()
    return defaults | params


def _render(body: str, schema: str) -> str:
    return (
        sql.SQL(body)
        .format(
            schema=sql.Identifier(schema),
            version=sql.Literal(SCHEMA_VERSION),
            lock_key=sql.Literal(f"singleton schema {schema}"),
        )
        .as_string(None)
    )


def _shut(fd: int) -> None:
    """Shut a socket down under whoever is blocked on it: their read returns at once with
    end-of-file. Through a duplicate, so the descriptor itself stays its owner's to close."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its owner: there is nobody left to wake


def _alive(conn: Connection) -> bool:
    """Whether an idle pooled connection is worth using. An idle connection has nothing to
    read: anything there (the FATAL a server sends as it shuts down or as
    ``pg_terminate_backend`` cuts us, or end-of-file) means it is gone, and finding that out
    costs no round trip."""
    info = conn.info
    if (
        conn.closed
        or info.status != ConnStatus.OK
        or info.transaction_status != TransactionStatus.IDLE
    ):
        return False
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return not poller.poll(0)


class _Watch:
    """Shuts a connection's socket down if its statement has not answered within ``limit``
    seconds; libpq then reports the connection lost, and the pool drops it."""

    def __init__(self, conn: Connection, limit: float) -> None:
        self._fd = conn.fileno()
        self._lock = threading.Lock()
        self._done = False
        self.fired = False
        self._timer = threading.Timer(max(0.0, limit), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._done:
                self.fired = True
                _shut(self._fd)

    def done(self) -> bool:
        """Stop watching (before the connection goes back to the pool); True if it fired."""
        self._timer.cancel()
        with self._lock:
            self._done = True
            return self.fired


#: Turns an error into the one-line message of a BackendUnavailable.
Describe = Callable[[BaseException], str]


class _Pool:
    """Up to ``size`` connections, each used by one thread at a time. New connections are
    opened by a helper thread, so a caller waits no longer than its own limit."""

    def __init__(
        self, connect: Callable[[], Connection], size: int, where: str, describe: Describe
    ) -> None:
        self._connect = connect
        self._size = size
        self._where = where
        self._describe = describe
        self._cond = threading.Condition()
        self._idle: list[Connection] = []
        self._open = 0  # connections idle, in use, or being opened
        self._connecting = False
        self._failures = 0
        self._failure: BaseException | None = None
        self._closed = False

    def take(self, limit: float) -> Connection:
        end = time.monotonic() + limit
        with self._cond:
            failures = self._failures
            while not self._closed:
                while self._idle:
                    conn = self._idle.pop()
                    if _alive(conn):
                        return conn
                    self._open -= 1
                    conn.close()
                if self._failures != failures and self._failure is not None:
                    raise BackendUnavailable(self._describe(self._failure)) from self._failure
                if self._open < self._size and not self._connecting:
                    self._open += 1
                    self._connecting = True
                    threading.Thread(
                        target=self._grow, name="postgres-connect", daemon=True
                    ).start()
                left = end - time.monotonic()
                if left <= 0:
                    raise BackendUnavailable(f"{self._where}: no connection within {limit:g}s")
                self._cond.wait(left)
        raise BackendUnavailable(f"{self._where}: the backend is closed")

    def _grow(self) -> None:
        """Open one connection (one at a time: against a stalled server, more would only
        pile up) and hand it to whoever waits."""
        try:
            conn = self._connect()
        except Exception as exc:  # whatever it was, the waiters must hear of it
            with self._cond:
                self._connecting = False
                self._open -= 1
                self._failures += 1
                self._failure = exc
                self._cond.notify_all()
            return
        with self._cond:
            self._connecting = False
        self.give_back(conn, reusable=True)

    def give_back(self, conn: Connection, reusable: bool) -> None:
        with self._cond:
            if reusable and not self._closed:
                self._idle.append(conn)
            else:
                self._open -= 1
                conn.close()
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            conn.close()


class _Listener:
    """``LISTEN`` on a connection and a thread of its own, on a channel of this listener's
    own: a release NOTIFYs it with the id of one wait in progress here, which it wakes (no
    other: each standby is told apart by its id, not by the lock it waits for)."""

    def __init__(self, connect: Callable[[], Connection], channel: str) -> None:
        self._connect = connect
        self.channel = channel
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        #: Waits in progress, and those of them a NOTIFY has woken.
        self._waiting: set[str] = set()
        self._woken: set[str] = set()
        #: Bumped whenever LISTEN is (re)established: releases in between were not heard.
        self._epoch = 0
        self._listening = False
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float) -> bool:
        """Start listening on first use; until it has listened once, wait up to ``timeout``
        for it. Whether it is listening now."""
        with self._cond:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name=f"listen-{self.channel}", daemon=True
                )
                self._thread.start()
            if self._epoch == 0:
                self._cond.wait_for(lambda: self._listening or self._stop.is_set(), timeout)
            return self._listening

    def enrol(self) -> tuple[str, int]:
        """A new wait: its id (the NOTIFY payload that wakes it) and the listening epoch."""
        with self._cond:
            waiter = str(next(self._ids))
            self._waiting.add(waiter)
            return waiter, self._epoch

    def wait(self, waiter: str, epoch: int, timeout: float) -> bool:
        """Until ``waiter`` is notified (True), listening stops or restarted after ``epoch``
        (its NOTIFY may have been missed), or timeout."""
        with self._cond:
            return (
                self._cond.wait_for(
                    lambda: waiter in self._woken or not self._listening or self._epoch != epoch,
                    max(0.0, timeout),
                )
                and waiter in self._woken
            )

    def forget(self, waiter: str) -> None:
        """The wait is over; a NOTIFY for it from now on is dropped."""
        with self._cond:
            self._waiting.discard(waiter)
            self._woken.discard(waiter)

    def _run(self) -> None:
        pause = 0.1
        while not self._stop.is_set():
            try:
                conn = self._connect()
            except Exception:  # unreachable: try again, less and less often
                pause = min(2.0, pause * 2)
            else:
                pause = 0.1
                self._listen(conn)
            self._stop.wait(pause)

    def _listen(self, conn: Connection) -> None:
        """Until the connection fails or the backend closes."""
        try:
            with self._cond:
                self._fd = conn.fileno()
            if self._stop.is_set():
                return
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
            with self._cond:
                self._listening = True
                self._epoch += 1
                self._cond.notify_all()
            for note in conn.notifies():
                with self._cond:
                    # A wait that ended before its NOTIFY came (timed out as it was chosen)
                    # is not woken; its caller tries to acquire anyway, as after any wait.
                    if note.payload in self._waiting:
                        self._woken.add(note.payload)
                        self._cond.notify_all()
        except psycopg.Error:
            pass  # the connection is gone: standbys poll until the next one listens
        finally:
            with self._cond:
                self._listening = False
                self._fd = None
                self._cond.notify_all()
            conn.close()

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            if self._fd is not None:
                _shut(self._fd)  # ends notifies() at once
            thread = self._thread
        if thread is not None:
            thread.join(timeout=2.0)


@dataclass(frozen=True)
class _Result:
    rows: list[tuple[Any, ...]]
    rowcount: int


def _attempt(doc: Mapping[str, Any] | None) -> Attempt | None:
    """An attempt from its row as ``to_jsonb`` gives it (times in ISO-8601 with an offset)."""
    return None if doc is None else Attempt.from_record(doc)


def _number(attempt: Attempt | None) -> int:
    return attempt.attempt if attempt else 0


class PostgresBackend:
    """Locks and ledger in one schema of a PostgreSQL database shared by every replica."""

    capabilities = Capabilities(fencing=True, shared=True, notify=True)

    def __init__(
        self,
        url: str,
        clock: Clock = SYSTEM_CLOCK,
        schema: str = "singleton",
        timeout: float | str = 5.0,
        pool_size: int = 4,
    ) -> None:
        """``timeout``: how long any statement (and a connect) may take before the backend
        counts as unavailable; ``pool_size``: connections per backend object, beside the one
        that listens for releases. Connects at once and creates the schema if missing."""
        self.url = url
        self._clock = clock
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigError(
                f"backend.schema {schema!r}: want a lower-case name of at most 48 letters,"
                " digits and underscores"
            )
        self.schema = schema
        try:
            self._timeout = parse_duration(timeout)
        except ConfigError as exc:
            raise ConfigError(f"backend.timeout: {exc}") from None
        if self._timeout <= 0:
            raise ConfigError(f"backend.timeout must be positive, got {timeout!r}")
        if not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigError(f"backend.pool_size must be a whole number ≥ 1, got {pool_size!r}")
        self._params = connection_params(url, self._timeout)
        self._password = str(self._params.get("password") or "")
        self._where = f"postgresql {_shown(url)}"
        self._sql = {name: _render(body, schema) for name, body in _STATEMENTS.items()}
        self._pool = _Pool(self._connect, pool_size, self._where, self._describe)
        # A channel per listener, so that a NOTIFY reaches only the process it wakes.
        self._listener = _Listener(self._connect, f"{schema}_{uuid.uuid4().hex[:12]}")
        try:
            #: The schema's version as this backend found it (0: it created the schema).
            self.found_version = self._using(self._ensure_schema)
        except BaseException:
            self.close()
            raise

    # -- connections --------------------------------------------------------------------------

    def _connect(self) -> Connection:
        return psycopg.connect(autocommit=True, **self._params)

    def _describe(self, exc: BaseException) -> str:
        detail = _one_line(exc)
        if self._password:
            detail = detail.replace(self._password, "***")
        return f"{self._where}: {detail}"

    def _using(self, work: Callable[[Connection], T], limit: float | None = None) -> T:
        """Run ``work`` on a pooled connection within ``limit`` seconds (default: the
        backend's timeout), with psycopg's errors translated at this one boundary."""
        limit = self._timeout if limit is None else limit
        end = time.monotonic() + limit
        conn = self._pool.take(limit)
        watch = _Watch(conn, end - time.monotonic())
        reusable = False
        try:
            result = work(conn)
            reusable = True
            return result
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if watch.fired:
                raise BackendUnavailable(f"{self._where}: no answer within {limit:.3g}s") from exc
            raise BackendUnavailable(self._describe(exc)) from exc
        except psycopg.Error as exc:
            raise BackendError(self._describe(exc)) from exc
        finally:
            cut = watch.done()
            self._pool.give_back(conn, reusable and not cut)

    def _run(
        self, statement: str, params: Mapping[str, Any], limit: float | None = None
    ) -> _Result:
        query = self._sql[statement]

        def execute(conn: Connection) -> _Result:
            cursor = conn.execute(query, params)
            return _Result(cursor.fetchall() if cursor.description else [], cursor.rowcount)

        return self._using(execute, limit)

    def _ensure_schema(self, conn: Connection) -> int:
        """Create or upgrade the schema if it is behind; the version found before."""
        try:
            row = conn.execute(self._sql["schema_version"]).fetchone()
            found = int(row[0]) if row and row[0] is not None else 0
        except psycopg.errors.UndefinedTable:
            found = 0
        if found > SCHEMA_VERSION:
            raise ConfigError(
                f"{self._where}: schema {self.schema} is at version {found}, newer than this"
                f" singleton knows ({SCHEMA_VERSION}): upgrade singleton"
            )
        if found < SCHEMA_VERSION:
            try:
                with conn.transaction():
                    conn.execute(self._sql["create_schema"])
            except psycopg.errors.InsufficientPrivilege as exc:
                raise ConfigError(
                    f"{self._where}: may not create schema {self.schema} ({_one_line(exc)}):"
                    " run 'singleton migrate CONFIG' as a user who may"
                ) from exc
        return found

    # -- lock -------------------------------------------------------------------------------

    def try_acquire(self, name: str, ttl: float, owner: str) -> Lease | None:
        sent = self._clock.monotonic()
        rows = self._run("acquire", {"name": name, "owner": owner, "ttl": float(ttl)}).rows
        if not rows:
            return None
        return Lease(name, owner, int(rows[0][0]), ttl, lease_deadline(sent, ttl))

    def renew(self, lease: Lease) -> Lease:
        """Within the lease's local deadline, or not at all: a renewal that answers later is
        of no use to the keeper, which must then declare the lease lost on time."""
        sent = self._clock.monotonic()
        left = lease.deadline - sent
        changed = self._run(
            "renew",
            {"name": lease.name, "owner": lease.owner, "token": lease.token, "ttl": lease.ttl},
            min(self._timeout, left) if left > 0 else None,
        ).rowcount
        if changed != 1:
            raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone")
        return lease.renewed(lease_deadline(sent, lease.ttl))

    def release(self, lease: Lease, keep_for: float = 0.0) -> None:
        self._run(
            "release",
            {
                "name": lease.name,
                "owner": lease.owner,
                "token": lease.token,
                "keep_for": float(keep_for),
            },
        )

    def holder(self, name: str) -> Holder | None:
        rows = self._run("holder", {"name": name}).rows
        if not rows:
            return None
        owner, token, left = rows[0]
        return Holder(name, owner, int(token), max(0.0, float(left)))

    def wait(self, name: str, timeout: float) -> None:
        """Stand in line for ``name`` until a release wakes this standby, the lease runs out
        on the database's clock, or ``timeout``. A release wakes one standby fleet-wide: the
        oldest one in line. Only a standby that found nobody ahead of it wakes at the lease's
        expiry, so an unreleased lease does not wake them all either; the others wake at
        their timeout, or when the first, having taken the lock, releases it. While no
        connection is listening, one short poll instead."""
        end = self._clock.monotonic() + timeout
        if not self._listener.start(min(timeout, _LISTEN_START)):
            holder = self.holder(name)
            if holder is not None:
                left = end - self._clock.monotonic()
                if holder.expires_in is not None:
                    left = min(left, holder.expires_in)
                self._clock.sleep(max(0.0, min(left, _POLL)))
            return
        waiter, epoch = self._listener.enrol()
        seq: int | None = None
        woken = False
        try:
            seq, expires_in, behind = self._run(
                "wait_enqueue",
                {
                    "name": name,
                    "channel": self._listener.channel,
                    "waiter": waiter,
                    "timeout": max(0.0, float(timeout)),
                },
            ).rows[0]
            if seq is None:
                return  # free: nothing to wait for
            left = end - self._clock.monotonic()
            if not behind and expires_in is not None:
                left = min(left, float(expires_in))
            woken = self._listener.wait(waiter, epoch, left)
        finally:
            self._listener.forget(waiter)
            if seq is not None and not woken:  # a release that woke us deleted the row
                # Best effort: a row left behind expires with the wait, as a dead
                # process's does, and a release that picks it wakes nobody; the next
                # standby's bounded wait covers that.
                with contextlib.suppress(BackendError):
                    self._run("wait_leave", {"seq": seq})

    def evict(self, name: str, token_above: int = 0) -> int:
        rows = self._run("evict", {"name": name, "token_above": token_above}).rows
        return int(rows[0][0])

    # -- ledger -----------------------------------------------------------------------------

    def _claim(self, run: Run, lease: Lease, seen: int, start: bool) -> Claim:
        current, found, started, highest = self._run(
            "claim",
            {
                "name": lease.name,
                "owner": lease.owner,
                "token": lease.token,
                "run_id": run.run_id,
                "job": run.job,
                "scheduled_at": run.scheduled_at,
                "replica": owner_replica(lease.owner),
                "seen": seen,
                "start": start,
                "now": self._clock.now(),
            },
        ).rows[0]
        if not current:
            raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone")
        return Claim(_attempt(found), _attempt(started), int(highest))

    def claim(self, run: Run, lease: Lease, *, seen: int = 0, start: bool = True) -> Claim:
        claim = self._claim(run, lease, seen, start)
        done = claim.latest is not None and claim.latest.state == SUCCEEDED
        if start and claim.attempt is None and _number(claim.latest) == seen and not done:
            # The attempt number was taken between the statement's read and its write (by a
            # skip, the one ledger write that holds no lease): look again to return it.
            claim = self._claim(run, lease, seen, start)
        return claim

    def acquire_and_claim(self, run: Run, ttl: float, owner: str) -> tuple[Lease, Claim] | None:
        sent = self._clock.monotonic()
        token, found, started, highest = self._run(
            "acquire_and_claim",
            {
                "name": run.job,
                "owner": owner,
                "ttl": float(ttl),
                "run_id": run.run_id,
                "job": run.job,
                "scheduled_at": run.scheduled_at,
                "replica": owner_replica(owner),
                "now": self._clock.now(),
            },
        ).rows[0]
        if token is None:
            return None
        lease = Lease(run.job, owner, int(token), ttl, lease_deadline(sent, ttl))
        latest, attempt = _attempt(found), _attempt(started)
        if latest is None and attempt is None:
            # A skip wrote attempt 1 between the read and the write: claim to return it.
            return lease, self.claim(run, lease)
        return lease, Claim(latest, attempt, int(highest))

    def _finish_params(
        self, run: Run, lease: Lease, attempt: int, outcome: Outcome
    ) -> dict[str, Any]:
        return {
            "run_id": run.run_id,
            "attempt": attempt,
            "token": lease.token,
            "state": outcome.state,
            "error": outcome.error,
            "reason": outcome.reason,
            "now": self._clock.now(),
        }

    def finish(self, run: Run, lease: Lease, attempt: int, outcome: Outcome) -> bool:
        params = self._finish_params(run, lease, attempt, outcome)
        return self._run("finish", params).rowcount == 1

    def finish_and_release(
        self, run: Run, lease: Lease, attempt: int, outcome: Outcome, keep_for: float = 0.0
    ) -> bool:
        params = self._finish_params(run, lease, attempt, outcome)
        params |= {"name": lease.name, "owner": lease.owner, "keep_for": float(keep_for)}
        return bool(self._run("finish_and_release", params).rows[0][0])

    def skip(self, run: Run, reason: str, replica: str) -> bool:
        params = {
            "run_id": run.run_id,
            "job": run.job,
            "reason": reason,
            "replica": replica,
            "scheduled_at": run.scheduled_at,
            "now": self._clock.now(),
        }
        return self._run("skip", params).rowcount == 1

    def attempts(self, run_id: str) -> list[Attempt]:
        rows = self._run("attempts", {"run_id": run_id}).rows
        return [a for (doc,) in rows if (a := _attempt(doc)) is not None]

    def history(self, job: str | None, limit: int) -> list[Attempt]:
        rows = self._run("history", {"job": job, "limit": limit or None}).rows
        return [a for (doc,) in rows if (a := _attempt(doc)) is not None]

    def prune(self, before: datetime, keep: int) -> int:
        """The same statement deletes expired shared state, which reads only skip."""
        return self._run("prune", {"before": before, "keep": keep}).rowcount

    # -- shared state -------------------------------------------------------------------------

    def put(self, key: str, value: str, ttl: float | None = None) -> None:
        self._run(
            "state_put", {"key": key, "value": value, "ttl": None if ttl is None else float(ttl)}
        )

    def scan(self, prefix: str) -> dict[str, str]:
        """One index range scan; expiry by the database's clock (``clock_timestamp()``)."""
        rows = self._run("state_scan", {"prefix": prefix}).rows
        return {str(key): str(value) for key, value in rows}

    def delete(self, key: str) -> None:
        self._run("state_delete", {"key": key})

    def server_time(self) -> datetime | None:
        """The database's clock, for the clock-skew check."""
        moment: datetime = self._run("server_time", {}).rows[0][0]
        return moment.astimezone(UTC)

    def close(self) -> None:
        """Drop every connection; leases held stay until they expire."""
        self._listener.close()
        self._pool.close()


def migrate(backend_url: str, **options: Any) -> str:
    """Create or upgrade the schema now — ``singleton migrate CONFIG``, for teams that run
    migrations themselves instead of letting the first replica do it. ``options`` are the
    config's backend options (``schema`` …). Returns a one-line summary."""
    if scheme(backend_url) not in ("postgresql", "postgres"):
        raise ConfigError(
            f"backend.url {_shown(backend_url)!r}: migrate is for postgresql:// backends"
        )
    backend = open_backend(backend_url, **options)
    assert isinstance(backend, PostgresBackend)
    backend.close()
    where = f"schema {backend.schema} in {_shown(backend_url)}"
    found = backend.found_version
    if found == 0:
        return f"{where}: created at version {SCHEMA_VERSION}"
    if found < SCHEMA_VERSION:
        return f"{where}: upgraded from version {found} to {SCHEMA_VERSION}"
    return f"{where}: already at version {SCHEMA_VERSION}"
