"""Prometheus metrics, fed by the firing's events.

Labels stay bounded: job, backend (the URL scheme) and outcome — never a run ID or a
replica, which would make a new series per firing. Each runner has its own registry, so
two runners in one process (tests) do not share counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from singleton.events import Event

#: Event kinds that end a run, and the ``singleton_runs_total`` outcome they count as.
_RUN_OUTCOMES = {
    "succeeded": "succeeded",
    "failed": "failed",
    "timed_out": "timed_out",
    "lost_lease": "lost_lease",
    "interrupted": "interrupted",
    "taken_over": "taken_over",
}
#: ``skipped`` reasons, and the outcome they count as.
_SKIP_OUTCOMES = {
    "duplicate": "skipped_duplicate",
    "busy": "skipped_busy",
    "overlap": "skipped_busy",
    "paused": "skipped_paused",
    "misfired": "misfired",
}
_DURATIONS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200)


class Metrics:
    """The metrics DESIGN names, as one events listener."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.registry = CollectorRegistry()
        r = self.registry
        self.acquire_seconds = Histogram(
            "singleton_lock_acquire_seconds",
            "Time from a firing's turn to acquiring its lock, or to giving up.",
            ["backend", "job", "outcome"],
            registry=r,
            buckets=_DURATIONS,
        )
        self.held_seconds = Histogram(
            "singleton_lock_held_seconds",
            "How long a lease was held, acquisition to release.",
            ["job"],
            registry=r,
            buckets=_DURATIONS,
        )
        self.contention = Counter(
            "singleton_lock_contention_total",
            "Firings that found the lock busy.",
            ["job"],
            registry=r,
        )
        self.renewals = Counter(
            "singleton_lease_renewals_total", "Successful lease renewals.", ["job"], registry=r
        )
        self.renewal_failures = Counter(
            "singleton_lease_renewal_failures_total",
            "Renewals that could not reach the coordinator (retried until the deadline).",
            ["job"],
            registry=r,
        )
        self.leases_lost = Counter(
            "singleton_leases_lost_total", "Leases lost while held.", ["job"], registry=r
        )
        self.runs = Counter(
            "singleton_runs_total",
            "Firings by how they ended here.",
            ["job", "outcome"],
            registry=r,
        )
        self.run_seconds = Histogram(
            "singleton_run_duration_seconds",
            "How long an attempt ran.",
            ["job", "outcome"],
            registry=r,
            buckets=_DURATIONS,
        )
        self.token = Gauge(
            "singleton_fencing_token", "The latest fencing token acquired.", ["job"], registry=r
        )
        self.regressions = Counter(
            "singleton_token_regressions_total",
            "Tokens from the coordinator no higher than one seen before (it lost data).",
            ["job"],
            registry=r,
        )
        self.fleet_disagreements = Gauge(
            "singleton_fleet_disagreements",
            "Jobs whose schedule, target or mode differ between live replicas.",
            registry=r,
        )
        self.paused = Gauge(
            "singleton_job_paused",
            "1 while the job is paused fleet-wide (singleton pause, pause_on_failure).",
            ["job"],
            registry=r,
        )
        self._paused_jobs: set[str] = set()
        self.clock_skew = Gauge(
            "singleton_clock_skew_seconds",
            "The coordinator's clock minus this host's, as last measured.",
            registry=r,
        )

    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)
        elif event.kind in _RUN_OUTCOMES:
            self._count_run(event, _RUN_OUTCOMES[event.kind])

    def text(self) -> bytes:
        """The exposition format for ``/metrics``."""
        return generate_latest(self.registry)

    def _count_run(self, event: Event, outcome: str) -> None:
        self.runs.labels(event.job, outcome).inc()
        duration = event.fields.get("duration")
        if duration is not None:
            self.run_seconds.labels(event.job, outcome).observe(duration)

    def _on_acquired(self, event: Event) -> None:
        self.acquire_seconds.labels(self.backend, event.job, "acquired").observe(
            event.fields.get("waited", 0.0)
        )
        if event.token is not None:
            self.token.labels(event.job).set(event.token)

    def _on_skipped(self, event: Event) -> None:
        reason = event.fields.get("reason")
        if reason == "busy":
            self.acquire_seconds.labels(self.backend, event.job, "busy").observe(
                event.fields.get("waited", 0.0)
            )
            self.contention.labels(event.job).inc()
        outcome = _SKIP_OUTCOMES.get(str(reason))
        if outcome is not None:
            self.runs.labels(event.job, outcome).inc()

    def _on_standby(self, event: Event) -> None:
        self.contention.labels(event.job).inc()

    def _on_released(self, event: Event) -> None:
        held = event.fields.get("held")
        if held is not None:
            self.held_seconds.labels(event.job).observe(held)

    def _on_renewed(self, event: Event) -> None:
        self.renewals.labels(event.job).inc()

    def _on_renewal_failed(self, event: Event) -> None:
        self.renewal_failures.labels(event.job).inc()

    def _on_lost(self, event: Event) -> None:
        self.leases_lost.labels(event.job).inc()

    def _on_token_regression(self, event: Event) -> None:
        self.regressions.labels(event.job).inc()

    def _on_fleet(self, event: Event) -> None:
        self.fleet_disagreements.set(event.fields.get("disagreements", 0))

    def _on_clock(self, event: Event) -> None:
        self.clock_skew.set(event.fields.get("skew", 0.0))

    def _on_pauses(self, event: Event) -> None:
        now = set(event.fields.get("jobs", ()))
        for job in now - self._paused_jobs:
            self.paused.labels(job).set(1)
        for job in self._paused_jobs - now:
            self.paused.labels(job).set(0)
        self._paused_jobs = now
