"""Fleet consistency: do all replicas agree on every job?

During a rolling upgrade, two replicas may run different schedules for one job. They would
name its firings differently (the run ID comes from the schedule), so the ledger could not
dedup them: the job would run twice. Each replica therefore publishes a fingerprint of each
job (schedule, target, mode) to the backend's shared state, and ``status``, ``check``, a
metric and the log show the jobs on which replicas disagree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

from singleton.backends.base import SharedState
from singleton.jobs import Job

#: Where replicas publish: ``fleet/<replica id>`` → a JSON map of job → fingerprint.
PREFIX = "fleet/"


def fingerprint(job: Job) -> str:
    """What must be equal on every replica for a job's firings to have one name each."""
    text = "\n".join((job.schedule.describe(), job.target.describe(), job.mode))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def fingerprints(jobs: Iterable[Job]) -> dict[str, str]:
    return {job.name: fingerprint(job) for job in jobs}


def publish(state: SharedState, replica: str, jobs: Iterable[Job], ttl: float) -> None:
    """Tell the fleet what this replica runs; it fades ``ttl`` after the replica stops."""
    state.put(PREFIX + replica, json.dumps(fingerprints(jobs), sort_keys=True), ttl=ttl)


def withdraw(state: SharedState, replica: str) -> None:
    state.delete(PREFIX + replica)


def published(state: SharedState) -> dict[str, dict[str, str]]:
    """Per live replica, its jobs' fingerprints."""
    found = {}
    for key, value in state.scan(PREFIX).items():
        try:
            found[key.removeprefix(PREFIX)] = json.loads(value)
        except ValueError:
            continue  # a record from an incompatible version: not ours to judge
    return found


def disagreements(
    fleet: Mapping[str, Mapping[str, str]], mine: Mapping[str, str] | None = None
) -> dict[str, dict[str, list[str]]]:
    """Jobs with more than one fingerprint among the replicas (and ``mine``, labelled
    ``this config``), as job → fingerprint → replicas."""
    seen: dict[str, dict[str, list[str]]] = {}
    sources = dict(fleet)
    if mine is not None:
        sources["this config"] = mine
    for replica, jobs in sorted(sources.items()):
        for job, print_ in jobs.items():
            seen.setdefault(job, {}).setdefault(print_, []).append(replica)
    return {job: prints for job, prints in sorted(seen.items()) if len(prints) > 1}


def describe(job: str, prints: Mapping[str, list[str]]) -> str:
    """One line for a log or a terminal."""
    groups = "; ".join(f"{', '.join(replicas)} run {fp}" for fp, replicas in prints.items())
    return f"replicas disagree about job {job!r}: {groups}"
