"""From a config file to what the commands need: settings, jobs, an open backend.

Everything a user can get wrong is found here, before anything is acquired: the file, the
jobs, and whether the backend can give what each job's mode needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from singleton.backends import open_backend
from singleton.backends.base import Backend, default_replica_id
from singleton.config import Settings, load_settings
from singleton.errors import ConfigError
from singleton.jobs import Job, resolve
from singleton.urls import redact, scheme


@dataclass(frozen=True)
class App:
    """A loaded configuration."""

    settings: Settings
    base: Path
    jobs: dict[str, Job]

    @property
    def replica_id(self) -> str:
        return self.settings.replica_id or default_replica_id()

    @property
    def backend_url(self) -> str:
        """The backend URL with a relative SQLite path made absolute against the config's
        folder, so every replica names the same file wherever it was started."""
        url = self.settings.backend.url
        relative = url.removeprefix("sqlite:///")
        if scheme(url) == "sqlite" and relative != url and not relative.startswith(("/", ":")):
            return f"sqlite:///{self.base / relative}"
        return url

    def open_backend(self) -> Backend:
        backend = open_backend(self.backend_url, **self.settings.backend.options)
        try:
            self.check_capabilities(backend)
        except ConfigError:
            backend.close()
            raise
        return backend

    def clock_skew(self, backend: Backend) -> float | None:
        """Seconds between this host's wall clock and the coordinator's (None: it has no
        clock). Fire times come from local clocks, so a large skew shifts every firing."""
        before = time.time()
        server = backend.server_time()
        if server is None:
            return None
        local = (before + time.time()) / 2
        return server.timestamp() - local

    def check_skew(self, backend: Backend) -> None:
        """``check`` refuses a skew beyond ``max_skew``; ``run`` logs it (see the runner)."""
        skew = self.clock_skew(backend)
        if skew is not None and abs(skew) > self.settings.max_skew:
            raise ConfigError(
                f"clock skew {skew:+.1f}s to the coordinator exceeds max_skew"
                f" {self.settings.max_skew:g}s: fix this host's time sync"
            )

    def warnings(self, backend: Backend) -> list[str]:
        """What works but may surprise: a session-bound backend (ZooKeeper) keeps a dead
        owner's lock for the whole session timeout, however short a job's ``lock_ttl``."""
        session = getattr(backend, "session_timeout", None)
        if not isinstance(session, int | float):
            return []
        return [
            f"jobs.{job.name}.lock_ttl {job.lock_ttl:g}s is shorter than the granted session"
            f" timeout {session:g}s: a crashed owner keeps the lock until its session expires"
            for job in self.jobs.values()
            if job.lock_ttl < session
        ]

    def check_capabilities(self, backend: Backend) -> None:
        """A job whose mode the backend cannot serve is refused at start, not at 2 a.m."""
        caps = backend.capabilities
        for job in self.jobs.values():
            if job.mode == "ownership" and not caps.fencing:
                why = f" ({caps.fencing_note})" if caps.fencing_note else ""
                raise ConfigError(
                    f"jobs.{job.name}: mode ownership needs a backend with fencing;"
                    f" {redact(self.settings.backend.url)} has none{why}"
                )
            if job.lock_ttl < caps.min_ttl:
                raise ConfigError(
                    f"jobs.{job.name}.lock_ttl: {job.lock_ttl:g}s is below this backend's minimum"
                    f" of {caps.min_ttl:g}s"
                )


def load(path: Path, *, with_jobs: bool = True) -> App:
    """Read and check the config at ``path``; ``with_jobs=False`` skips importing job code
    (for commands that only read the ledger)."""
    settings, base, lines = load_settings(path)
    if not with_jobs:
        return App(settings, base, {})
    try:
        return App(settings, base, resolve(settings, base))
    except ConfigError as exc:
        # Errors found after validation (a cron, a target, a timezone) start with the key's
        # path, "jobs.<name>…"; point them at the job's line as validation errors do.
        key = str(exc).split(":", 1)[0]
        line = lines.find(tuple(key.split(".")[:2])) if key.startswith("jobs.") else None
        raise ConfigError(f"{path}:{line}: {exc}" if line else f"{path}: {exc}") from None
