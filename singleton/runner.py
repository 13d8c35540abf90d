"""``singleton run``: the scheduler, the firings in flight, and a graceful shutdown.

Shutdown (SIGTERM, SIGINT): stop firing; standbys give up at once; running jobs get
``shutdown_grace`` to finish, then are stopped (``interrupted``) with ``kill_grace`` to
die; every lease is released so a standby elsewhere takes over without waiting for a TTL.
A second signal exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from datetime import datetime, timedelta
from types import FrameType

from prometheus_client import CONTENT_TYPE_LATEST

from singleton import fleet
from singleton.app import App
from singleton.backends.base import Backend, Run, SharedState
from singleton.clock import SYSTEM_CLOCK, Clock
from singleton.events import Events, log_event
from singleton.firing import Firer
from singleton.jobs import Job
from singleton.metrics import Metrics
from singleton.schedule import run_id
from singleton.scheduler import Scheduler
from singleton.sentry import setup as sentry_setup
from singleton.server import Endpoint, Route, json_route
from singleton.status import replica_status
from singleton.urls import redact, scheme

log = logging.getLogger("singleton.runner")

#: How often the ledger's retention is enforced (any replica may do it; it is idempotent).
PRUNE_EVERY = 3600.0
#: How often the clock skew to the coordinator is measured and the fleet compared.
SKEW_EVERY = 60.0
#: How long a replica's published fingerprints outlive its last publication.
FLEET_TTL = 3 * SKEW_EVERY


class Runner:
    """One replica: schedules every job and fires it through the shared backend."""

    def __init__(self, app: App, backend: Backend, clock: Clock = SYSTEM_CLOCK) -> None:
        self.app = app
        self.backend = backend
        self.clock = clock
        self.replica = app.replica_id
        self.events = Events(self.replica)
        self.events.add(log_event)
        self.metrics = Metrics(scheme(backend.url))
        self.events.add(self.metrics)
        self.sentry = sentry_setup(app.settings.sentry, app.jobs)
        if self.sentry is not None:
            self.events.add(self.sentry)
        self.stopping = threading.Event()
        self.firer = Firer(backend, self.replica, clock, self.events, self.stopping)
        self.scheduler = Scheduler(list(app.jobs.values()), clock, self.dispatch)
        self._in_flight: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._signals = 0
        self._scheduling = threading.Event()
        self._scheduler_thread = threading.Thread(
            target=self.scheduler.run, args=(self.stopping,), name="scheduler", daemon=True
        )
        self.endpoint: Endpoint | None = None
        if app.settings.server.listen:
            self.endpoint = Endpoint(app.settings.server.listen, self._routes())

    # -- firing -----------------------------------------------------------------------------

    def dispatch(self, job: Job, scheduled_at: datetime) -> None:
        """Start a firing in its own thread, unless this replica is still busy with the
        job's previous firing: as its owner it records the new one as an ``overlap`` skip;
        as a standby it leaves the new one to the owner."""
        with self._lock:
            busy = job.name in self._in_flight
            if not busy:
                thread = threading.Thread(
                    target=self._fire,
                    args=(job, scheduled_at),
                    name=f"fire-{job.name}",
                    daemon=True,
                )
                self._in_flight[job.name] = thread
                thread.start()
                return
        run = Run(job.name, run_id(job.name, scheduled_at), scheduled_at)
        if self.firer.owns(job.name):
            threading.Thread(target=self._skip_overlap, args=(run,), daemon=True).start()
        else:
            self.events.emit(
                "skipped", job.name, run.run_id, reason="busy_standing_by", recorded=False
            )

    def _fire(self, job: Job, scheduled_at: datetime) -> None:
        try:
            self.firer.fire(job, scheduled_at)
        except Exception as exc:
            log.exception("firing failed", extra={"fields": {"job": job.name, "error": str(exc)}})
        finally:
            with self._lock:
                self._in_flight.pop(job.name, None)

    def _skip_overlap(self, run: Run) -> None:
        try:
            written = self.backend.skip(run, "overlap", self.replica)
            self.events.emit("skipped", run.job, run.run_id, reason="overlap", recorded=written)
        except Exception as exc:
            log.exception(
                "recording an overlap failed", extra={"fields": {"job": run.job, "error": str(exc)}}
            )

    def _housekeeping(self) -> None:
        """Enforce the ledger's retention every hour; every minute watch the clock skew to
        the coordinator and compare this replica's jobs with the fleet's. None of it may
        ever stop the scheduler."""
        next_prune = self.clock.monotonic()
        while not self.stopping.is_set():
            if self.clock.monotonic() >= next_prune:
                self._prune()
                next_prune = self.clock.monotonic() + PRUNE_EVERY
            self._check_skew()
            self._check_fleet()
            self.clock.wait(self.stopping, SKEW_EVERY)
        self._leave_fleet()

    def _check_fleet(self) -> None:
        if not isinstance(self.backend, SharedState):
            return
        try:
            fleet.publish(self.backend, self.replica, self.app.jobs.values(), FLEET_TTL)
            found = fleet.disagreements(fleet.published(self.backend))
        except Exception as exc:
            log.warning("comparing with the fleet failed", extra={"fields": {"error": str(exc)}})
            return
        self.events.emit("fleet", "-", disagreements=len(found))
        for job, prints in found.items():
            self.events.emit("fleet_disagreement", job, detail=fleet.describe(job, prints))

    def _leave_fleet(self) -> None:
        if isinstance(self.backend, SharedState):
            try:
                fleet.withdraw(self.backend, self.replica)
            except Exception as exc:
                log.warning("leaving the fleet failed", extra={"fields": {"error": str(exc)}})

    def _prune(self) -> None:
        retention = self.app.settings.backend
        try:
            before = self.clock.now() - timedelta(seconds=retention.ledger_retention)
            gone = self.backend.prune(before, retention.ledger_keep)
            if gone:
                log.info("pruned the ledger", extra={"fields": {"rows": gone}})
        except Exception as exc:
            log.warning("pruning the ledger failed", extra={"fields": {"error": str(exc)}})

    def _check_skew(self) -> None:
        try:
            skew = self.app.clock_skew(self.backend)
        except Exception as exc:
            log.warning(
                "reading the coordinator's clock failed", extra={"fields": {"error": str(exc)}}
            )
            return
        if skew is None:
            return
        self.events.emit("clock", "-", skew=round(skew, 3))
        if abs(skew) > self.app.settings.max_skew:
            self.events.emit(
                "clock_skew", "-", skew=round(skew, 3), max_skew=self.app.settings.max_skew
            )

    # -- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        """Run until :meth:`stop` (or a signal, when called from the main thread); exit code."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        for warning in self.app.warnings(self.backend):
            log.warning(warning)
        log.info(
            "started",
            extra={
                "fields": {
                    "replica": self.replica,
                    "jobs": len(self.app.jobs),
                    "backend": redact(self.backend.url),
                }
            },
        )
        scheduler = self._scheduler_thread
        scheduler.start()
        self._scheduling.set()
        threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True).start()
        if self.endpoint is not None:
            self.endpoint.start()
        try:
            while not self.stopping.is_set():
                self.stopping.wait(1.0)
            self._scheduling.clear()
            scheduler.join()
            self._drain()
        finally:
            if self.endpoint is not None:
                self.endpoint.stop()
            if self.sentry is not None:
                self.sentry.flush()
        log.info("stopped", extra={"fields": {"replica": self.replica}})
        return 0

    # -- the endpoint -----------------------------------------------------------------------

    def _routes(self) -> dict[str, Route]:
        def text(ok: bool) -> tuple[int, str, bytes]:
            return (200, "text/plain", b"ok\n") if ok else (503, "text/plain", b"not ready\n")

        return {
            "/healthz": lambda: text(self._scheduler_thread.is_alive() or self.stopping.is_set()),
            "/readyz": lambda: text(self._scheduling.is_set()),
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, self.metrics.text()),
            "/status": json_route(
                lambda: (
                    200,
                    replica_status(
                        self.backend,
                        self.app.backend_url,
                        self.replica,
                        list(self.app.jobs.values()),
                        self.scheduler.next_fire_times(),
                        self.firer.held(),
                    ),
                )
            ),
        }

    def stop(self) -> None:
        self.stopping.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            os.write(2, b"singleton: second signal, exiting now\n")
            os._exit(1)
        log.info("shutting down", extra={"fields": {"signal": signal.Signals(signum).name}})
        self.stop()

    def _drain(self) -> None:
        """Let running jobs finish within ``shutdown_grace``, then stop them."""
        settings = self.app.settings
        if not self._wait_idle(settings.shutdown_grace):
            self.firer.interrupt_all()
            if not self._wait_idle(settings.kill_grace + 2.0):
                self.firer.abandon_all()

    def _wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._in_flight.values())
            if not threads:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            threads[0].join(min(left, 0.1))
