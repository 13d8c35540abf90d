"""What an operator asks at 2 a.m.: who holds each lock, with which token, for how long,
and how each job's last attempt ended. One shape for ``singleton status --json`` and for
the sidecar's ``/status``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from singleton.backends.base import Attempt, Backend, owner_replica
from singleton.clock import iso_z
from singleton.jobs import Job
from singleton.pausing import read as read_pauses
from singleton.urls import redact


def attempt_json(row: Attempt) -> dict[str, Any]:
    """One attempt in the ``history --json`` shape (DESIGN, "Contracts")."""
    return row.to_record()


def lock_json(backend: Backend, name: str) -> dict[str, Any] | None:
    """The holder of ``name`` now, or None when it is free."""
    holder = backend.holder(name)
    if holder is None:
        return None
    return {
        "holder": holder.owner,
        "replica": owner_replica(holder.owner),
        "token": holder.token,
        "lease_left": None if holder.expires_in is None else round(holder.expires_in, 3),
    }


def snapshot(backend: Backend, jobs: list[Job]) -> list[dict[str, Any]]:
    """Per job: schedule, mode, the lock's holder, its pause (who, when, why, until) and
    the last attempt."""
    pauses = read_pauses(backend, datetime.now(UTC))
    result = []
    for job in jobs:
        paused = pauses.get(job.name)
        last = backend.history(job.name, 1)
        result.append(
            {
                "name": job.name,
                "schedule": job.schedule.describe(),
                "mode": job.mode,
                "lock": lock_json(backend, job.name),
                "paused": paused.to_json() if paused else None,
                "last_attempt": attempt_json(last[0]) if last else None,
            }
        )
    return result


def replica_status(
    backend: Backend,
    url: str,
    replica: str,
    jobs: list[Job],
    next_fire: dict[str, datetime],
    held_here: dict[str, dict[str, object]],
) -> dict[str, Any]:
    """The sidecar's ``/status``: this replica's view, and the coordinator's when it answers.

    A coordinator that cannot be reached is reported, not raised: this is the page an
    operator opens when it cannot be reached.
    """
    try:
        shared = {job["name"]: job for job in snapshot(backend, jobs)}
        reachable, error = True, None
    except Exception as exc:
        shared, reachable, error = {}, False, f"{type(exc).__name__}: {redact(str(exc))}"
    rows = []
    for job in jobs:
        seen = shared.get(job.name, {})
        rows.append(
            {
                "name": job.name,
                "schedule": job.schedule.describe(),
                "mode": job.mode,
                "next": iso_z(next_fire[job.name]) if job.name in next_fire else None,
                "held_here": held_here.get(job.name),
                "lock": seen.get("lock"),
                "paused": seen.get("paused"),
                "last_attempt": seen.get("last_attempt"),
            }
        )
    return {
        "replica": replica,
        "backend": {"url": redact(url), "reachable": reachable, "error": error},
        "jobs": rows,
    }
