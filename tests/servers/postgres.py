"""A real PostgreSQL 15 for tests: ``initdb`` in a temp dir, ``postgres`` on a free port.

PostgreSQL refuses to run as root, so both run as the ``postgres`` user through
``Popen(user=...)`` (not ``runuser``: then the pid we hold would be runuser's, and stopping
took seconds). The data dir lives under /tmp, not under pytest's ``tmp_path``, whose parents
the ``postgres`` user cannot enter.

``initdb`` runs once per test session into a template; every server is a copy of it, so a
test that restarts or pauses its own server costs a copy and a start (well under a second),
not another ``initdb``. Test modules share one server through :func:`shared_server`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import psycopg

from tests.servers import binary, free_port, stop, wait_until

BIN = Path("/usr/lib/postgresql/15/bin")
USER = "postgres"


def _as_postgres(
    command: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC", **(env or {})},
            user=USER,
            group=USER,
            extra_groups=[],
        )


def _private_dir(prefix: str) -> Path:
    """A temp dir the ``postgres`` user owns."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.chown(path, USER, USER)
    return path


def _initdb(root: Path) -> Path:
    data = root / "data"
    process = _as_postgres(
        [
            binary(str(BIN / "initdb")),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        root / "initdb.log",
        root,
    )
    if process.wait(timeout=60) != 0:
        raise AssertionError(f"initdb failed:\n{(root / 'initdb.log').read_text()}")
    return data


class PostgresServer:
    """One ``postgres`` process on a copy of the template data dir, with the faults tests
    inject: restart, pause (SIGSTOP of every server process), cut one client's connection."""

    def __init__(self, template: Path, env: dict[str, str] | None = None) -> None:
        self.env = env
        self.root = _private_dir("singleton-pg-")
        self.data = self.root / "data"
        subprocess.run(["cp", "-a", str(template), str(self.data)], check=True)
        self.port = free_port()
        self.log = self.root / "postgres.log"
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        self.process = _as_postgres(
            [
                binary(str(BIN / "postgres")),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=300",
                "-c",
                "fsync=off",  # only an OS crash could lose data, and no test crashes the OS
            ],
            self.log,
            self.root,
            self.env,
        )
        wait_until(f"postgres on port {self.port}", self._ready)

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"postgres exited:\n{self.log.read_text()[-3000:]}")
        try:
            psycopg.connect(self.url(), connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def stop(self) -> None:
        """Fast shutdown (SIGINT): clients are disconnected, committed data is kept."""
        if self.process is not None:
            stop(self.process, signal.SIGINT)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _pids(self) -> list[int]:
        """The postmaster and its children (one backend per client connection)."""
        assert self.process is not None
        parent = self.process.pid
        found = [parent]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry.name))
        return found

    def pause(self) -> None:
        """SIGSTOP every server process: connections stay open and the kernel still
        acknowledges packets, but nothing answers (a stalled database, not a dead one)."""
        self._signal_all(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_all(signal.SIGCONT)

    def _signal_all(self, signum: int) -> None:
        # A connection's backend process may exit between the listing and the signal.
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def heal(self) -> None:
        """Undo whatever a test did to the server: resume it, start it if stopped."""
        if self.process is None:
            self.start()
        else:
            self.resume()

    def sql(self, statement: str, dbname: str = "postgres") -> list[tuple[object, ...]]:
        with psycopg.connect(self.url(dbname), autocommit=True) as conn:
            cursor = conn.execute(statement)
            return cursor.fetchall() if cursor.description else []

    def create_database(self) -> str:
        """A new empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def sessions(self, application_name: str) -> int:
        """How many connections with this ``application_name`` the server has."""
        rows = self.sql(
            f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{application_name}'"
        )
        return int(str(rows[0][0]))

    def terminate(self, application_name: str) -> None:
        """``pg_terminate_backend`` every connection with this ``application_name``, and wait
        until they are gone (the server ends them asynchronously)."""
        self.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            f" WHERE application_name = '{application_name}'"
        )
        wait_until(f"{application_name} cut off", lambda: self.sessions(application_name) == 0)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class _Template:
    """The session's one ``initdb``, shared by every server; removed with the last user."""

    def __init__(self) -> None:
        self._users = 0
        self._root: Path | None = None

    @contextmanager
    def data(self) -> Iterator[Path]:
        if self._root is None:
            self._root = _private_dir("singleton-pg-template-")
            _initdb(self._root)
        root = self._root
        self._users += 1
        try:
            yield root / "data"
        finally:
            self._users -= 1
            if self._users == 0:
                shutil.rmtree(root, ignore_errors=True)
                self._root = None


class _Shared:
    """One server for every test module that asks: each module's session fixture enters
    :meth:`server`, and the server stops when the last one leaves."""

    def __init__(self) -> None:
        self._users = 0
        self._server: PostgresServer | None = None

    @contextmanager
    def server(self) -> Iterator[PostgresServer]:
        with _TEMPLATE.data() as template:
            if self._server is None:
                self._server = PostgresServer(template)
                self._server.start()
            server = self._server
            self._users += 1
            try:
                yield server
            finally:
                self._users -= 1
                if self._users == 0:
                    server.remove()
                    self._server = None


_TEMPLATE = _Template()
_SHARED = _Shared()


@contextmanager
def fresh_server(env: dict[str, str] | None = None) -> Iterator[PostgresServer]:
    """A server of one's own, for tests that restart or pause it (``env``: extra
    environment for the server process, such as libfaketime's)."""
    with _TEMPLATE.data() as template:
        server = PostgresServer(template, env)
        try:
            server.start()
            yield server
        finally:
            server.remove()


def shared_server() -> AbstractContextManager[PostgresServer]:
    """The session's shared server (see :class:`_Shared`). Tests on it must use unique names
    or a database of their own (:meth:`PostgresServer.create_database`), and must not
    disrupt it."""
    return _SHARED.server()
