"""``sqlite:///path.db``: the embedded default, for many processes on one host.

Why these choices:

* Lease expiry is stored on the host's **monotonic** clock together with the boot id. Every
  process on a Linux host reads the same ``CLOCK_MONOTONIC``, it never jumps, and neither a
  skewed wall clock nor ``faketime`` (with ``FAKETIME_DONT_FAKE_MONOTONIC``) can move it; a
  reboot restarts it, so a row written under another boot id counts as expired.
* Acquisition is one ``INSERT … ON CONFLICT … DO UPDATE … WHERE expired … RETURNING`` and
  the token is a counter column bumped by the same statement, so a token is never issued
  twice; the row outlives its lease, so the counter survives release.
* WAL with ``synchronous=FULL``: a token that was handed out is on disk, so a power loss
  cannot make the counter go backwards.
* Both fused fast paths are one ``BEGIN IMMEDIATE`` transaction each. A claim checks the lease
  in the same transaction; a finish is one ``UPDATE … WHERE`` on the attempt's token and
  ``running`` state, not the lease (``overlap: allow`` releases the lock right after the
  claim), and a takeover marks the attempt abandoned: a stale owner cannot write either way.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

from singleton.backends.base import (
    ABANDONED,
    RUNNING,
    SKIPPED,
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
from singleton.clock import SYSTEM_CLOCK, Clock, iso_z
from singleton.errors import BackendUnavailable, ConfigError, LeaseLost

SCHEMA = """
CREATE TABLE IF NOT EXISTS singleton_locks (
    name     TEXT PRIMARY KEY,
    owner    TEXT,
    token    INTEGER NOT NULL DEFAULT 0,
    boot_id  TEXT,
    expires  REAL
);
CREATE TABLE IF NOT EXISTS singleton_attempts (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id       TEXT NOT NULL,
    attempt      INTEGER NOT NULL,
    job          TEXT NOT NULL,
    state        TEXT NOT NULL,
    reason       TEXT,
    token        INTEGER,
    replica      TEXT NOT NULL,
    scheduled_at TEXT NOT NULL,
    started_at   TEXT,
    finished_at  TEXT,
    error        TEXT,
    UNIQUE (run_id, attempt)
);
CREATE INDEX IF NOT EXISTS singleton_attempts_by_job ON singleton_attempts (job, seq);
CREATE INDEX IF NOT EXISTS singleton_attempts_by_token ON singleton_attempts (job, token);
CREATE TABLE IF NOT EXISTS singleton_state (
    key      TEXT PRIMARY KEY,
    value    TEXT NOT NULL,
    boot_id  TEXT,
    expires  REAL
);
"""

_ACQUIRE = """
INSERT INTO singleton_locks (name, owner, token, boot_id, expires)
VALUES (:name, :owner, 1, :boot, :expires)
ON CONFLICT (name) DO UPDATE
   SET owner = excluded.owner, token = singleton_locks.token + 1,
       boot_id = excluded.boot_id, expires = excluded.expires
 WHERE singleton_locks.owner IS NULL
    OR singleton_locks.boot_id IS NOT excluded.boot_id
    OR singleton_locks.expires <= :now
RETURNING token
"""

_IS_CURRENT = """
SELECT 1 FROM singleton_locks
 WHERE name = :name AND owner = :owner AND token = :token AND boot_id = :boot AND expires > :now
"""

_COLUMNS = (
    "run_id, job, attempt, state, token, replica, scheduled_at, started_at, finished_at,"
    " reason, error"
)

#: Filesystems on which SQLite's locking is known to be unreliable.
_NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "ceph", "glusterfs"}

#: How often a standby re-reads the lock row; a local read costs microseconds.
_POLL = 0.05


def boot_id() -> str:
    """This boot's id: monotonic readings are comparable only between equal boot ids."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def _filesystem(path: Path) -> str | None:
    """The type of the filesystem holding ``path``, from /proc/mounts (longest match)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    target = str(path)
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and (
            target == fields[1] or target.startswith(fields[1].rstrip("/") + "/")
        ):
            if len(fields[1]) >= len(best):
                best, kind = fields[1], fields[2]
    return kind


def database_path(url: str) -> Path:
    """The file a ``sqlite://`` URL names; ``sqlite:///rel.db`` is relative, ``////abs.db`` not."""
    parts = urlsplit(url)
    raw = parts.path[1:] if parts.path.startswith("/") else parts.path
    if parts.netloc or not raw or raw == ":memory:":
        raise ConfigError(
            f"backend.url {url!r}: want sqlite:///relative.db or sqlite:////absolute.db "
            "(an in-memory database cannot be shared between replicas)"
        )
    return Path(raw)


def _attempt(row: sqlite3.Row) -> Attempt:
    return Attempt.from_record(dict(row))


class SqliteBackend:
    """Locks and ledger in one SQLite file shared by every replica on the host."""

    capabilities = Capabilities(fencing=True, shared=False, notify=False)

    def __init__(self, url: str, clock: Clock = SYSTEM_CLOCK, busy_timeout: float = 2.0) -> None:
        self.url = url
        self.path = database_path(url).resolve()
        self._clock = clock
        self._boot = boot_id()
        self._check_path()
        self._mutex = threading.Lock()
        try:
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
            )
            self._conn.row_factory = sqlite3.Row
            self._wal(busy_timeout)
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise BackendUnavailable(f"sqlite database {self.path}: {exc}") from exc

    def _wal(self, patience: float) -> None:
        """Switch the file to WAL. Switching takes an exclusive lock and does not honour the
        busy timeout, so replicas starting together on a new file retry for a while."""
        deadline = self._clock.monotonic() + patience
        while True:
            try:
                mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            except sqlite3.OperationalError:
                if self._clock.monotonic() > deadline:
                    raise
                self._clock.sleep(0.01)
                continue
            if mode != "wal":
                raise ConfigError(f"backend.url: {self.path} cannot use WAL mode ({mode})")
            return

    def _check_path(self) -> None:
        folder = self.path.parent
        if not folder.is_dir():
            raise ConfigError(f"backend.url: folder {folder} does not exist")
        if not os.access(folder, os.W_OK):
            raise ConfigError(f"backend.url: folder {folder} is not writable")
        kind = _filesystem(folder)
        if kind in _NETWORK_FS:
            raise ConfigError(
                f"backend.url: {self.path} is on a network filesystem ({kind}); "
                "SQLite locking is not reliable there: use a server backend"
            )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: the write lock is taken up front, so two
        replicas never both read a free lock and both write."""
        with self._mutex:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise BackendUnavailable(f"sqlite database {self.path}: {exc}") from exc
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._conn.execute("ROLLBACK")
                raise BackendUnavailable(f"sqlite database {self.path}: {exc}") from exc

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            try:
                yield self._conn
            except sqlite3.OperationalError as exc:
                raise BackendUnavailable(f"sqlite database {self.path}: {exc}") from exc

    # -- lock -------------------------------------------------------------------------------

    def _acquire(self, conn: sqlite3.Connection, name: str, ttl: float, owner: str) -> Lease | None:
        sent = self._clock.monotonic()
        row = conn.execute(
            _ACQUIRE,
            {"name": name, "owner": owner, "boot": self._boot, "expires": sent + ttl, "now": sent},
        ).fetchone()
        if row is None:
            return None
        return Lease(name, owner, int(row[0]), ttl, lease_deadline(sent, ttl))

    def _ensure_current(self, conn: sqlite3.Connection, lease: Lease) -> None:
        found = conn.execute(
            _IS_CURRENT,
            {
                "name": lease.name,
                "owner": lease.owner,
                "token": lease.token,
                "boot": self._boot,
                "now": self._clock.monotonic(),
            },
        ).fetchone()
        if found is None:
            raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone")

    def try_acquire(self, name: str, ttl: float, owner: str) -> Lease | None:
        with self._tx() as conn:
            return self._acquire(conn, name, ttl, owner)

    def renew(self, lease: Lease) -> Lease:
        sent = self._clock.monotonic()
        with self._tx() as conn:
            changed = conn.execute(
                "UPDATE singleton_locks SET expires = :expires"
                " WHERE name = :name AND owner = :owner"
                " AND token = :token AND boot_id = :boot AND expires > :now",
                {
                    "expires": sent + lease.ttl,
                    "name": lease.name,
                    "owner": lease.owner,
                    "token": lease.token,
                    "boot": self._boot,
                    "now": sent,
                },
            ).rowcount
        if changed != 1:
            raise LeaseLost(f"lock {lease.name!r}: lease with token {lease.token} is gone")
        return lease.renewed(lease_deadline(sent, lease.ttl))

    def _release(self, conn: sqlite3.Connection, lease: Lease, keep_for: float) -> None:
        if keep_for > 0:
            sql = "UPDATE singleton_locks SET expires = MIN(expires, :until)"
        else:
            sql = "UPDATE singleton_locks SET owner = NULL, expires = NULL"
        conn.execute(
            sql + " WHERE name = :name AND owner = :owner AND token = :token",
            {
                "until": self._clock.monotonic() + keep_for,
                "name": lease.name,
                "owner": lease.owner,
                "token": lease.token,
            },
        )

    def release(self, lease: Lease, keep_for: float = 0.0) -> None:
        with self._tx() as conn:
            self._release(conn, lease, keep_for)

    def holder(self, name: str) -> Holder | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT owner, token, boot_id, expires FROM singleton_locks WHERE name = ?", (name,)
            ).fetchone()
        now = self._clock.monotonic()
        if (
            row is None
            or row["owner"] is None
            or row["boot_id"] != self._boot
            or row["expires"] <= now
        ):
            return None
        return Holder(name, row["owner"], row["token"], row["expires"] - now)

    def wait(self, name: str, timeout: float) -> None:
        """Poll the lock row: SQLite has no notification between processes, and a local read
        costs microseconds, so a short poll gives a prompt takeover for little."""
        end = self._clock.monotonic() + timeout
        while self.holder(name) is not None:
            left = end - self._clock.monotonic()
            if left <= 0:
                return
            self._clock.sleep(min(_POLL, left))

    def evict(self, name: str, token_above: int = 0) -> int:
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO singleton_locks (name, token) VALUES (:name, :above)"
                " ON CONFLICT (name) DO UPDATE"
                " SET token = MAX(token, :above), owner = NULL, expires = NULL",
                {"name": name, "above": token_above},
            )
            row = conn.execute(
                "SELECT token FROM singleton_locks WHERE name = ?", (name,)
            ).fetchone()
        return int(row[0])

    # -- ledger -----------------------------------------------------------------------------

    def _latest(self, conn: sqlite3.Connection, run_id: str) -> Attempt | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM singleton_attempts WHERE run_id = ?"
            " ORDER BY attempt DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        return _attempt(row) if row else None

    def _claim(
        self, conn: sqlite3.Connection, run: Run, lease: Lease, seen: int, start: bool
    ) -> Claim:
        latest = self._latest(conn, run.run_id)
        highest = conn.execute(
            "SELECT COALESCE(MAX(token), 0) FROM singleton_attempts WHERE job = ?", (run.job,)
        ).fetchone()[0]
        if (latest.attempt if latest else 0) != seen:
            return Claim(latest, None, highest)
        if latest is not None and latest.state == SUCCEEDED:
            # Done, whatever the caller saw: a stale owner's finish can land between the
            # caller's read and this claim. The read above is in this BEGIN IMMEDIATE
            # transaction, so no finish can land between it and the writes below.
            return Claim(latest, None, highest)
        now = iso_z(self._clock.now(), millis=True)
        if latest is not None and latest.state == RUNNING:
            conn.execute(
                "UPDATE singleton_attempts SET state = ?, finished_at = ?"
                " WHERE run_id = ? AND attempt = ?",
                (ABANDONED, now, run.run_id, latest.attempt),
            )
        if not start:
            return Claim(latest, None, highest)
        conn.execute(
            "INSERT INTO singleton_attempts (run_id, attempt, job, state, token, replica,"
            " scheduled_at, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run.run_id,
                seen + 1,
                run.job,
                RUNNING,
                lease.token,
                owner_replica(lease.owner),
                iso_z(run.scheduled_at),
                now,
            ),
        )
        return Claim(latest, self._latest(conn, run.run_id), highest)

    def claim(self, run: Run, lease: Lease, *, seen: int = 0, start: bool = True) -> Claim:
        with self._tx() as conn:
            self._ensure_current(conn, lease)
            return self._claim(conn, run, lease, seen, start)

    def acquire_and_claim(self, run: Run, ttl: float, owner: str) -> tuple[Lease, Claim] | None:
        with self._tx() as conn:
            lease = self._acquire(conn, run.job, ttl, owner)
            if lease is None:
                return None
            return lease, self._claim(conn, run, lease, 0, True)

    def _finish(
        self, conn: sqlite3.Connection, run: Run, lease: Lease, attempt: int, outcome: Outcome
    ) -> bool:
        changed = conn.execute(
            "UPDATE singleton_attempts SET state = ?, error = ?, reason = ?, finished_at = ?"
            " WHERE run_id = ? AND attempt = ? AND token = ? AND state = ?",
            (
                outcome.state,
                outcome.error,
                outcome.reason,
                iso_z(self._clock.now(), millis=True),
                run.run_id,
                attempt,
                lease.token,
                RUNNING,
            ),
        ).rowcount
        return bool(changed)

    def finish(self, run: Run, lease: Lease, attempt: int, outcome: Outcome) -> bool:
        with self._tx() as conn:
            return self._finish(conn, run, lease, attempt, outcome)

    def finish_and_release(
        self, run: Run, lease: Lease, attempt: int, outcome: Outcome, keep_for: float = 0.0
    ) -> bool:
        with self._tx() as conn:
            done = self._finish(conn, run, lease, attempt, outcome)
            self._release(conn, lease, keep_for)
            return done

    def skip(self, run: Run, reason: str, replica: str) -> bool:
        with self._tx() as conn:
            changed = conn.execute(
                "INSERT INTO singleton_attempts (run_id, attempt, job, state, reason, replica,"
                " scheduled_at, finished_at) SELECT ?, 1, ?, ?, ?, ?, ?, ?"
                " WHERE NOT EXISTS (SELECT 1 FROM singleton_attempts WHERE run_id = ?)",
                (
                    run.run_id,
                    run.job,
                    SKIPPED,
                    reason,
                    replica,
                    iso_z(run.scheduled_at),
                    iso_z(self._clock.now(), millis=True),
                    run.run_id,
                ),
            ).rowcount
        return bool(changed)

    def attempts(self, run_id: str) -> list[Attempt]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM singleton_attempts WHERE run_id = ? ORDER BY attempt DESC",
                (run_id,),
            ).fetchall()
        return [_attempt(row) for row in rows]

    def history(self, job: str | None, limit: int) -> list[Attempt]:
        where = "WHERE job = :job" if job is not None else ""
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM singleton_attempts {where} ORDER BY seq DESC LIMIT :limit",
                {"job": job, "limit": limit or -1},
            ).fetchall()
        return [_attempt(row) for row in rows]

    def prune(self, before: datetime, keep: int) -> int:
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM singleton_state WHERE expires IS NOT NULL"
                " AND (boot_id IS NOT :boot OR expires <= :now)",
                {"boot": self._boot, "now": self._clock.monotonic()},
            )
            return conn.execute(
                "DELETE FROM singleton_attempts WHERE state != :running AND (scheduled_at < :before"
                " OR seq IN (SELECT seq FROM (SELECT seq, ROW_NUMBER() OVER"
                " (PARTITION BY job ORDER BY seq DESC) AS n FROM singleton_attempts)"
                " WHERE n > :keep))",
                {"running": RUNNING, "before": iso_z(before), "keep": keep},
            ).rowcount

    # -- shared state -------------------------------------------------------------------------

    def put(self, key: str, value: str, ttl: float | None = None) -> None:
        expires = None if ttl is None else self._clock.monotonic() + ttl
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO singleton_state (key, value, boot_id, expires) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " boot_id = excluded.boot_id, expires = excluded.expires",
                (key, value, self._boot, expires),
            )

    def scan(self, prefix: str) -> dict[str, str]:
        """Expiry by the same monotonic clock and boot id as leases; expired rows stay until
        overwritten or pruned, and are never returned."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT key, value FROM singleton_state WHERE substr(key, 1, :n) = :prefix"
                " AND (expires IS NULL OR (boot_id = :boot AND expires > :now))",
                {
                    "n": len(prefix),
                    "prefix": prefix,
                    "boot": self._boot,
                    "now": self._clock.monotonic(),
                },
            ).fetchall()
        return {row["key"]: row["value"] for row in rows}

    def delete(self, key: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM singleton_state WHERE key = ?", (key,))

    def server_time(self) -> datetime | None:
        """None: the database is on this host, and so is its clock."""
        return None

    def close(self) -> None:
        with self._mutex:
            self._conn.close()
