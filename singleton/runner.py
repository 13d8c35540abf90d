"""``singleton run``: the scheduler, the firings in flight, and a graceful shutdown.

Shutdown (SIGTERM, SIGINT): stop firing; standbys give up at once; running jobs get
``shutdown_grace`` to finish, then are stopped (``interrupted``) with ``kill_grace`` to
die; every lease is released so a standby elsewhere takes over without waiting for a TTL.
A second signal exits at once.

Overlap (a firing due while this replica still works on the job's previous one) follows the
job's ``overlap``: ``skip`` records it; ``buffer_one`` and ``buffer_all`` queue it to run
right after; ``cancel_other`` stops the running firing and queues the new one; ``allow``
(efficiency mode) starts it alongside. Every replica queues, not only the owner, so a
buffered firing survives the owner's death; the ledger runs each once.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Mapping
from datetime import datetime, timedelta
from types import FrameType

from prometheus_client import CONTENT_TYPE_LATEST

from singleton import fleet, logs, pausing
from singleton.app import App
from singleton.backends.base import Backend, Outcome, Run, SharedState
from singleton.clock import SYSTEM_CLOCK, Clock, iso_z
from singleton.events import Events, log_event
from singleton.firing import Firer
from singleton.jobs import MAX_CATCHUP, Job
from singleton.metrics import Metrics
from singleton.pausing import Pause, PauseWatch
from singleton.schedule import fires_between, run_id
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
#: At most this many firings wait behind a running one (``overlap: buffer_all``); more are
#: recorded as ``overlap`` skips.
MAX_BUFFERED = 100
#: ``catchup: latest`` looks this far back through a schedule for its latest firing.
MAX_CATCHUP_SCAN = 100 * MAX_CATCHUP

#: A firing waiting its turn: its instant, and whether it may run past ``misfire_grace``.
Pending = tuple[datetime, bool]


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
        self.pauses = PauseWatch(backend, clock)
        self.firer = Firer(backend, self.replica, clock, self.events, self.stopping, self.pauses)
        #: Seconds this host's clock runs ahead of the coordinator's, as last measured.
        self._ahead = 0.0
        self.scheduler = Scheduler(
            list(app.jobs.values()), clock, self.dispatch, ahead=lambda: self._ahead
        )
        #: Per job, the threads working on its firings here (more than one: ``allow``).
        self._in_flight: dict[str, list[threading.Thread]] = {}
        #: Per job, firings waiting for the one in flight here, each with whether it may
        #: run late (buffered by the ``overlap`` policy) or not (queued behind a standby).
        self._buffered: dict[str, deque[Pending]] = {}
        self._lock = threading.Lock()
        self._signals = 0
        self._scheduling = threading.Event()
        self._scheduler_thread: threading.Thread | None = None
        #: Firings dropped by an overlap policy, for one thread to record: the scheduler
        #: never waits on the backend, and a burst of them costs no thread each.
        self._overlaps: queue.SimpleQueue[Run | None] = queue.SimpleQueue()
        self._overlap_recorder: threading.Thread | None = None
        self.endpoint: Endpoint | None = None
        if app.settings.server.listen:
            self.endpoint = Endpoint(app.settings.server.listen, self._routes())

    # -- firing -----------------------------------------------------------------------------

    def dispatch(self, job: Job, scheduled_at: datetime) -> None:
        """Start a firing in its own thread, unless this replica is still busy with the
        job's previous firing. Running it here, or under a buffering policy, the job's
        ``overlap`` policy decides. Under ``skip``, only standing by for it (or checking
        that it is done), the newest firing waits its turn and then goes the normal way, so
        no firing is lost while an owner elsewhere is dead or slow: it runs, or is recorded
        as a duplicate, a misfire or an overlap."""
        with self._lock:
            if job.overlap == "allow" or job.name not in self._in_flight:
                self._start(job, deque([(scheduled_at, False)]))
                return
            running = self.firer.running(job.name)
            if running or job.overlap != "skip":
                # Standbys buffer as the owner does, so a buffered firing outlives its owner.
                dropped = self._buffer(job, scheduled_at)
            else:
                dropped = self._behind_standby(job, scheduled_at)
        if running and job.overlap == "cancel_other" and self.firer.cancel(job.name):
            self.events.emit("cancelling", job.name, for_run=run_id(job.name, scheduled_at))
        for when in dropped:
            self._record_overlap(Run(job.name, run_id(job.name, when), when))

    def _buffer(self, job: Job, scheduled_at: datetime) -> list[datetime]:
        """Queue ``scheduled_at`` behind the firing running here as the policy says (the
        caller holds the lock); the firings it drops, to be recorded as overlaps."""
        if job.overlap == "cancel_other":
            queue = self._buffered.setdefault(job.name, deque())
            superseded = [when for when, _ in queue]  # as the running one is
            queue.clear()
            return superseded + self._queue(job, (scheduled_at, True), 1)
        if job.overlap == "buffer_all":
            return self._queue(job, (scheduled_at, True), MAX_BUFFERED)
        if job.overlap == "buffer_one":
            return self._queue(job, (scheduled_at, True), 1)
        return [scheduled_at]

    def _behind_standby(self, job: Job, scheduled_at: datetime) -> list[datetime]:
        """Keep only the newest firing behind a standby (the caller holds the lock): a
        standby trails the fleet, and waiting for each firing in turn would make it trail
        further. The one it replaces is recorded as an ``overlap`` unless it has an attempt
        already (someone not busy ran it), so no firing disappears without a trace."""
        queue = self._buffered.setdefault(job.name, deque())
        replaced = [when for when, late_ok in queue if not late_ok]
        kept = [item for item in queue if item[1]]
        queue.clear()
        queue.extend(kept)
        return replaced + self._queue(job, (scheduled_at, False), MAX_BUFFERED)

    def _queue(self, job: Job, firing: Pending, bound: int) -> list[datetime]:
        """Add ``firing`` to the job's queue unless it holds ``bound`` already (the caller
        holds the lock); what did not fit."""
        queue = self._buffered.setdefault(job.name, deque())
        if len(queue) >= bound:
            return [firing[0]]
        queue.append(firing)
        when = firing[0]
        self.events.emit("buffered", job.name, run_id(job.name, when), waiting=len(queue))
        return []

    def _start(self, job: Job, firings: deque[Pending]) -> None:
        """A thread that runs ``firings`` in order, then whatever was queued meanwhile
        (the caller holds the lock)."""
        thread = threading.Thread(
            target=self._fire_in_turn,
            args=(job, firings),
            name=f"fire-{job.name}",
            daemon=True,
        )
        self._in_flight.setdefault(job.name, []).append(thread)
        thread.start()

    def _fire_in_turn(self, job: Job, firings: deque[Pending]) -> None:
        me = threading.current_thread()
        try:
            while True:
                if not firings:
                    with self._lock:
                        queue = self._buffered.get(job.name)
                        if not queue or self.stopping.is_set():
                            self._done(job, me)
                            return
                        firings.append(queue.popleft())
                self._fire(job, *firings.popleft())
        except BaseException:
            with self._lock:
                self._done(job, me)
            raise

    def _done(self, job: Job, thread: threading.Thread) -> None:
        """Forget a finished thread (the caller holds the lock)."""
        threads = self._in_flight.get(job.name, [])
        if thread in threads:
            threads.remove(thread)
        if not threads:
            self._in_flight.pop(job.name, None)
            left = self._buffered.pop(job.name, None)
            if left:
                log.info(
                    "buffered firings dropped at shutdown",
                    extra={"fields": {"job": job.name, "firings": len(left)}},
                )

    def _fire(self, job: Job, scheduled_at: datetime, late_ok: bool) -> None:
        try:
            outcome = self.firer.fire(job, scheduled_at, late_ok=late_ok)
            self._watch_failures(job, outcome)
        except Exception as exc:
            log.exception("firing failed", extra={"fields": {"job": job.name, "error": str(exc)}})

    def _watch_failures(self, job: Job, outcome: Outcome | None) -> None:
        """``pause_on_failure: N``: after a failed run, pause the job fleet-wide if the
        ledger's last N runs all failed (whichever replicas ran them)."""
        limit = job.pause_on_failure
        if limit is None or outcome is None or outcome.state not in pausing.FAILURES:
            return
        rows = self.backend.history(job.name, limit * job.max_attempts * 4 + 50)
        streak = pausing.failure_streak(rows)
        if streak < limit or self.pauses.get(job.name) is not None:
            return
        note = f"{streak} consecutive failed runs (pause_on_failure: {limit})"
        pausing.pause(self.backend, Pause(job.name, self.replica, self.clock.now(), note))
        self.pauses.refresh()
        self.events.emit("paused", job.name, by=self.replica, note=note)

    def _start_catch_ups(self, since: datetime) -> None:
        with self._lock:
            for job in self.app.jobs.values():
                if job.catchup == "none":
                    continue
                thread = threading.Thread(
                    target=self._catch_up,
                    args=(job, since),
                    name=f"catch-up-{job.name}",
                    daemon=True,
                )
                self._in_flight.setdefault(job.name, []).append(thread)
                thread.start()

    def _watch_pauses(self) -> None:
        names = set(self.app.jobs)

        def seen(pauses: Mapping[str, Pause]) -> None:
            self.events.emit("pauses", "-", jobs=sorted(names & set(pauses)))

        self.pauses.run(self.stopping, seen)

    def _catch_up(self, job: Job, until: datetime) -> None:
        """``catchup``: the firings of the window before this replica started that the
        ledger has never heard of (the whole fleet was down) are run now, oldest first, each
        under its own run ID, so two replicas starting at once still run each once."""
        start = until - timedelta(seconds=job.catchup_window)
        limit = MAX_CATCHUP_SCAN if job.catchup == "latest" else MAX_CATCHUP
        missed: deque[Pending] = deque()
        try:
            found = fires_between(job.schedule, start, until, limit)
            if job.catchup == "latest":
                found = found[-1:]
            missed.extend(
                (when, True) for when in found if not self.backend.attempts(run_id(job.name, when))
            )
        except Exception as exc:
            log.warning(
                "catching up failed", extra={"fields": {"job": job.name, "error": str(exc)}}
            )
        self.events.emit("catching_up", job.name, missed=len(missed), policy=job.catchup)
        self._fire_in_turn(job, missed)

    def _record_overlap(self, run: Run) -> None:
        with self._lock:
            if self._overlap_recorder is None:
                self._overlap_recorder = threading.Thread(
                    target=self._record_overlaps, name="overlaps", daemon=True
                )
                self._overlap_recorder.start()
        self._overlaps.put(run)

    def _record_overlaps(self) -> None:
        while (run := self._overlaps.get()) is not None:
            try:
                written = self.backend.skip(run, "overlap", self.replica)
                self.events.emit("skipped", run.job, run.run_id, reason="overlap", recorded=written)
            except Exception as exc:
                log.exception(
                    "recording an overlap failed",
                    extra={"fields": {"job": run.job, "error": str(exc)}},
                )

    def _housekeeping(self) -> None:
        """Enforce the ledger's retention every hour; every minute watch the clock skew to
        the coordinator (the first time in :meth:`run`) and compare this replica's jobs with
        the fleet's. None of it may ever stop the scheduler."""
        next_prune = self.clock.monotonic()
        while not self.stopping.is_set():
            if self.clock.monotonic() >= next_prune:
                self._prune()
                next_prune = self.clock.monotonic() + PRUNE_EVERY
            self._check_fleet()
            if self.clock.wait(self.stopping, SKEW_EVERY):
                break
            self._check_skew()
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
        self._ahead = max(0.0, -skew)
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
        # Before the first firing: a clock found ahead of the coordinator's is waited out.
        self._check_skew()
        since = self.clock.now()  # where the schedule starts; catch-up covers the time before
        log.info(
            "started",
            extra={
                "fields": {
                    "replica": self.replica,
                    "jobs": len(self.app.jobs),
                    "backend": redact(self.backend.url),
                    "schedule_from": iso_z(since),
                }
            },
        )
        self._scheduler_thread = scheduler = threading.Thread(
            target=self.scheduler.run, args=(self.stopping, since), name="scheduler", daemon=True
        )
        housekeeping = threading.Thread(target=self._housekeeping, name="housekeeping", daemon=True)
        housekeeping.start()
        self._start_catch_ups(since)
        scheduler.start()
        threading.Thread(target=self._watch_pauses, name="pauses", daemon=True).start()
        self._scheduling.set()
        if self.endpoint is not None:
            self.endpoint.start()
        try:
            while not self.stopping.is_set():
                self.stopping.wait(1.0)
            self._scheduling.clear()
            scheduler.join()
            self._drain()
            if self._overlap_recorder is not None:
                self._overlaps.put(None)
                self._overlap_recorder.join(self.app.settings.kill_grace)
            # It leaves the fleet on its way out: before the caller closes the backend.
            housekeeping.join(self.app.settings.kill_grace)
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
            "/healthz": lambda: text(self._scheduling_alive() or self.stopping.is_set()),
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

    def _scheduling_alive(self) -> bool:
        return self._scheduler_thread is not None and self._scheduler_thread.is_alive()

    def stop(self) -> None:
        self.stopping.set()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:
            logs.flush()
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
                threads = [thread for each in self._in_flight.values() for thread in each]
            if not threads:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            threads[0].join(min(left, 0.1))
