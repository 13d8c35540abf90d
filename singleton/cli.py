"""The ``singleton`` command: a thin click adapter over the library.

Exit codes (a contract): 0 ok; 1 a job failed; 2 usage; 69 backend unavailable;
78 configuration error. A user's mistake ends with one line on stderr, never a traceback.
"""

from __future__ import annotations

import getpass
import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import click

from singleton import app as app_module
from singleton import backfill as backfilling
from singleton import fleet, logs, pausing
from singleton.backends.base import Attempt, Backend, SharedState
from singleton.clock import SYSTEM_CLOCK, iso_z, parse_iso
from singleton.durations import parse_duration
from singleton.errors import BackendUnavailable, ConfigError, SingletonError
from singleton.events import Events, log_event
from singleton.firing import Firer
from singleton.jobs import Job, check_name
from singleton.logs import configure
from singleton.schedule import fire_times
from singleton.status import attempt_json, snapshot
from singleton.urls import redact, scheme

EXIT_JOB_FAILED = 1
EXIT_UNAVAILABLE = 69
EXIT_CONFIG = 78

CONFIG = click.argument("config", type=click.Path(path_type=Path, dir_okay=False))


@contextmanager
def _errors() -> Iterator[None]:
    """Turn our errors into one line and the contract's exit code."""
    try:
        yield
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", EXIT_CONFIG)
    except BackendUnavailable as exc:
        _fail(f"backend unavailable: {exc}", EXIT_UNAVAILABLE)
    except SingletonError as exc:
        _fail(str(exc), EXIT_JOB_FAILED)


def _fail(message: str, code: int) -> None:
    logs.flush()  # the log lines before it first: this is the last line
    click.echo(f"singleton: {redact(message)}", err=True)
    sys.exit(code)


def _when(value: str | None) -> datetime:
    if value is None:
        return datetime.now(UTC)
    try:
        return parse_iso(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r}: {exc}" if "timezone" in str(exc) else f"{value!r} is not an ISO-8601 time"
        ) from None


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version("singleton-runner"), prog_name="singleton")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="Overrides logging.level of the config.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="Overrides logging.format of the config.",
)
@click.pass_context
def main(ctx: click.Context, log_level: str | None, log_format: str | None) -> None:
    """Run each firing of each scheduled job once across every replica of a service."""
    ctx.obj = {"log_level": log_level, "log_format": log_format}
    configure(log_level or "info", log_format or "text")


def _load(path: Path, *, with_jobs: bool = True) -> app_module.App:
    loaded = app_module.load(path, with_jobs=with_jobs)
    options: dict[str, Any] = click.get_current_context().find_root().obj or {}
    logging_config = loaded.settings.logging
    configure(
        options.get("log_level") or logging_config.level,
        options.get("log_format") or logging_config.format,
    )
    return loaded


@main.command()
@CONFIG
def run(config: Path) -> None:
    """Run the scheduler on this replica until SIGTERM or SIGINT."""
    from singleton.runner import Runner

    with _errors():
        loaded = _load(config)
        backend = loaded.open_backend()
    try:
        code = Runner(loaded, backend).run()
    finally:
        backend.close()
    sys.exit(code)


@main.command()
@CONFIG
def check(config: Path) -> None:
    """Check the config, the jobs and the backend, then exit."""
    with _errors():
        loaded = _load(config)
        backend = loaded.open_backend()
        try:
            loaded.check_skew(backend)
            warnings = loaded.warnings(backend)
            if isinstance(backend, SharedState):
                mine = fleet.fingerprints(loaded.jobs.values())
                found = fleet.disagreements(fleet.published(backend), mine)
                warnings += [fleet.describe(job, prints) for job, prints in found.items()]
                paused = pausing.read(backend, datetime.now(UTC))
                warnings += [
                    _paused_line(name, item.to_json())
                    for name, item in sorted(paused.items())
                    if name in loaded.jobs
                ]
            for warning in warnings:
                click.echo(f"singleton: warning: {warning}", err=True)
        finally:
            backend.close()
    click.echo(f"ok: {len(loaded.jobs)} jobs, backend {redact(loaded.backend_url)}")


@main.command()
@CONFIG
@click.option(
    "--next",
    "count",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="How many fire times per job.",
)
@click.option("--from", "start", default=None, help="ISO-8601 time to start from (default now).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def jobs(config: Path, count: int, start: str | None, as_json: bool) -> None:
    """List jobs with their schedule and next fire times."""
    moment = _when(start)
    with _errors():
        loaded = _load(config)
    listing: list[dict[str, Any]] = [
        {
            "name": job.name,
            "schedule": job.schedule.describe(),
            "mode": job.mode,
            "target": job.target.describe(),
            "lock_ttl": job.lock_ttl,
            "next": [iso_z(t) for t in fire_times(job.schedule, moment, count)],
        }
        for job in loaded.jobs.values()
    ]
    if as_json:
        click.echo(json.dumps(listing, indent=2))
        return
    rows = [[j["name"], j["schedule"], j["mode"], ", ".join(j["next"][:3]) or "-"] for j in listing]
    click.echo(_table(["job", "schedule", "mode", "next"], rows))


def _job(loaded: app_module.App, name: str) -> Job:
    if name not in loaded.jobs:
        raise ConfigError(f"unknown job {name!r}; known: {', '.join(sorted(loaded.jobs))}")
    return loaded.jobs[name]


def _note_pause(backend: Backend, job: str) -> None:
    """``trigger`` and ``backfill`` run a paused job (they are explicit requests), but say so."""
    paused = pausing.read(backend, datetime.now(UTC)).get(job)
    if paused is not None:
        line = _paused_line(job, paused.to_json())
        click.echo(f"singleton: note: {line}; running it anyway", err=True)


def _firer(loaded: app_module.App, backend: Backend, stopping: threading.Event) -> Firer:
    """A replica of one firing at a time, for the commands that run jobs themselves."""
    events = Events(loaded.replica_id)
    events.add(log_event)
    return Firer(backend, loaded.replica_id, SYSTEM_CLOCK, events, stopping)


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _duration(row: Attempt) -> str:
    if row.started_at and row.finished_at:
        return f"{(row.finished_at - row.started_at).total_seconds():.2f}s"
    return "-"


@main.command()
@CONFIG
@click.argument("job", required=False)
@click.option(
    "--limit", type=click.IntRange(min=0), default=100, show_default=True, help="0 shows all."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def history(config: Path, job: str | None, limit: int, as_json: bool) -> None:
    """Show attempts from the ledger, newest first."""
    with _errors():
        loaded = _load(config, with_jobs=False)
        backend = loaded.open_backend()
        try:
            rows = backend.history(job, limit)
        finally:
            backend.close()
    if as_json:
        click.echo(json.dumps([attempt_json(row) for row in rows], indent=2))
        return
    table = [
        [
            row.run_id,
            str(row.attempt),
            row.state + (f" ({row.reason})" if row.reason else ""),
            _cell(row.token),
            row.replica,
            _duration(row),
            _cell(row.error)[:60],
        ]
        for row in rows
    ]
    click.echo(_table(["run id", "#", "state", "token", "replica", "took", "error"], table))


@main.command()
@CONFIG
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config: Path, as_json: bool) -> None:
    """Show each job's lock holder, token and lease left, and its last attempt."""
    with _errors():
        loaded = _load(config)
        backend = loaded.open_backend()
        try:
            jobs_now = snapshot(backend, list(loaded.jobs.values()))
            replicas = fleet.published(backend) if isinstance(backend, SharedState) else {}
        finally:
            backend.close()
    disagree = fleet.disagreements(replicas)
    if as_json:
        body = {
            "backend": redact(loaded.backend_url),
            "jobs": jobs_now,
            "fleet": {"replicas": sorted(replicas), "disagreements": disagree},
        }
        click.echo(json.dumps(body, indent=2))
        return
    rows = []
    for job in jobs_now:
        lock, last = job["lock"] or {}, job["last_attempt"] or {}
        rows.append(
            [
                job["name"],
                job["mode"] + (" (paused)" if job["paused"] else ""),
                _cell(lock.get("replica")),
                _cell(lock.get("token")),
                f"{lock['lease_left']:.1f}s" if lock.get("lease_left") is not None else "-",
                _cell(last.get("run_id")),
                _cell(last.get("state")),
            ]
        )
    headers = ["job", "mode", "holder", "token", "lease left", "last run", "state"]
    click.echo(_table(headers, rows))
    for job in jobs_now:
        if job["paused"]:
            click.echo(f"\n{_paused_line(job['name'], job['paused'])}")
    if replicas:
        click.echo(f"\n{len(replicas)} replicas running: {', '.join(sorted(replicas))}")
    for name, prints in disagree.items():
        click.echo(f"warning: {fleet.describe(name, prints)}")


@main.command()
@CONFIG
@click.argument("job")
def trigger(config: Path, job: str) -> None:
    """Run JOB once now in this process, under its lock, with a manual run ID.

    Exits 0 if the run succeeded, 1 if it failed or could not run.
    """
    with _errors():
        loaded = _load(config)
        _job(loaded, job)
        backend = loaded.open_backend()
        _note_pause(backend, job)
    firer = _firer(loaded, backend, threading.Event())
    signal.signal(signal.SIGTERM, lambda signum, frame: firer.interrupt_all())
    try:
        with _errors():
            outcome = firer.trigger(loaded.jobs[job])
    finally:
        backend.close()
    if outcome is None:
        _fail(f"{job} did not run: its lock stayed busy or the run was refused (see the log)", 1)
    elif outcome.state != "succeeded":
        _fail(f"{job} {outcome.state}: {outcome.error}", EXIT_JOB_FAILED)
    click.echo(f"{job} succeeded")


def _paused_line(job: str, paused: dict[str, Any]) -> str:
    until = f" until {paused['until']}" if paused["until"] else " until resumed"
    note = f": {paused['note']}" if paused["note"] else ""
    return f"{job} paused by {paused['by']} at {paused['at']}{until}{note}"


def _until(value: str | None, now: datetime) -> datetime | None:
    """``--until``: an ISO-8601 time with its zone, or a duration from now (``2h``)."""
    if value is None:
        return None
    try:
        until = now + timedelta(seconds=parse_duration(value))
    except ConfigError:
        try:
            until = parse_iso(value)
        except ValueError:
            raise click.BadParameter(
                f"{value!r}: expected a duration (2h) or an ISO-8601 time with its zone",
                param_hint="--until",
            ) from None
    if until <= now:
        raise click.BadParameter(f"{value!r} is not in the future", param_hint="--until")
    return until


@main.command()
@CONFIG
@click.argument("job")
@click.option("--note", default=None, help="Why, for whoever reads status next.")
@click.option(
    "--until", "until_text", default=None, help="An ISO-8601 time, or a duration such as 2h."
)
def pause(config: Path, job: str, note: str | None, until_text: str | None) -> None:
    """Pause JOB on every replica: its firings are recorded as skipped (paused).

    Returns once every running replica is bound to see the pause before its next firing.
    """
    now = datetime.now(UTC)
    until = _until(until_text, now)
    with _errors():
        loaded = _load(config)
        _job(loaded, job)
        backend = loaded.open_backend()
        try:
            by = f"{getpass.getuser()}@{socket.gethostname()}"
            pausing.pause(backend, pausing.Pause(job, by, now, note, until))
        finally:
            backend.close()
    time.sleep(pausing.FRESH)
    click.echo(_paused_line(job, pausing.Pause(job, by, now, note, until).to_json()))


@main.command()
@CONFIG
@click.argument("job")
def resume(config: Path, job: str) -> None:
    """Resume JOB on every replica, from its next firing on."""
    with _errors():
        loaded = _load(config)
        _job(loaded, job)
        backend = loaded.open_backend()
        try:
            was = pausing.read(backend, datetime.now(UTC)).get(job)
            pausing.resume(backend, job)
        finally:
            backend.close()
    click.echo(f"resumed {job}" if was else f"{job} was not paused")


@main.command()
@CONFIG
@click.argument("job")
@click.option("--from", "start_text", required=True, help="ISO-8601 time: the first firing.")
@click.option("--to", "end_text", required=True, help="ISO-8601 time: the last firing.")
@click.option("--dry-run", is_flag=True, help="Show what would run, run nothing.")
def backfill(config: Path, job: str, start_text: str, end_text: str, dry_run: bool) -> None:
    """Run each firing of JOB from --from to --to that the ledger does not show as
    succeeded, one at a time under the job's lock. Safe to interrupt and run again.

    Exits 0 when every one of them succeeded, 1 otherwise.
    """
    start, end, now = _when(start_text), _when(end_text), datetime.now(UTC)
    if start > end:
        raise click.BadParameter("--from is after --to", param_hint="--from")
    if end > now:
        raise click.BadParameter(
            "is in the future: the running replicas fire those", param_hint="--to"
        )
    with _errors():
        loaded = _load(config)
        _quiet_unless_asked(loaded)
        target = _job(loaded, job)
        retention = loaded.settings.backend.ledger_retention
        if start < now - timedelta(seconds=retention):
            raise ConfigError(
                f"--from {iso_z(start)} is older than backend.ledger_retention"
                f" ({retention:g}s): the ledger cannot tell which of those firings ran"
            )
        backend = loaded.open_backend()
    try:
        with _errors():
            planned = backfilling.plan(backend, target, start, end)
            _note_pause(backend, job)
            if dry_run:
                _backfill_table(planned, dry_run=True)
                return
            results = _backfill(loaded, backend, target, planned)
    finally:
        backend.close()
    _backfill_table(results, dry_run=False)
    if not all(f.done or f.succeeded for f in results):
        sys.exit(EXIT_JOB_FAILED)


def _quiet_unless_asked(loaded: app_module.App) -> None:
    """A line per state change would bury the progress bar and the summary; warnings and
    errors still show, and ``--log-level`` brings the rest back."""
    options: dict[str, Any] = click.get_current_context().find_root().obj or {}
    if options.get("log_level") is None:
        configure("warning", options.get("log_format") or loaded.settings.logging.format)


def _backfill(
    loaded: app_module.App, backend: Backend, job: Job, planned: list[backfilling.Firing]
) -> list[backfilling.Firing]:
    stopping = threading.Event()
    firer = _firer(loaded, backend, stopping)

    def stop(signum: int, frame: object) -> None:
        if stopping.is_set():
            sys.exit(130)
        click.echo("\nsingleton: stopping after the firing in progress", err=True)
        stopping.set()
        firer.interrupt_all()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    results = {f.run_id: f for f in planned}
    with click.progressbar(
        [f for f in planned if not f.done],
        label=f"backfilling {job.name}",
        file=sys.stderr,
        item_show_func=lambda f: f.run_id if f else None,
    ) as bar:
        for firing in bar:
            if stopping.is_set():
                break
            results[firing.run_id] = backfilling.run_one(firer, job, firing)
    return list(results.values())


def _backfill_table(firings: list[backfilling.Firing], dry_run: bool) -> None:
    rows = []
    for f in firings:
        if dry_run:
            plan = "leave (succeeded)" if f.done else "run"
            rows.append([f.run_id, backfilling.describe(f.before), plan])
        else:
            after = "left alone" if f.done else backfilling.describe(f.after)
            rows.append([f.run_id, backfilling.describe(f.before), after])
    heads = ["run id", "before", "would" if dry_run else "after"]
    click.echo(_table(heads, rows))
    todo = [f for f in firings if not f.done]
    if dry_run:
        click.echo(f"\n{len(todo)} of {len(firings)} firings would run")
        return
    ran = [f for f in todo if f.after is not None]
    good = sum(f.succeeded for f in ran)
    line = f"\n{len(ran)} of {len(todo)} firings run: {good} succeeded, {len(ran) - good} not"
    if len(ran) < len(todo):
        line += f"; {len(todo) - len(ran)} left: run the same command again to finish"
    click.echo(line)


@main.command()
@CONFIG
@click.argument("name")
@click.option("--force", is_flag=True, help="Required: the holder may still be running.")
@click.option(
    "--token-above",
    type=click.IntRange(min=0),
    default=0,
    help="Move the token counter past N (a token a resource has seen).",
)
def unlock(config: Path, name: str, force: bool, token_above: int) -> None:
    """Break-glass: remove NAME's lease and fence its holder.

    The holder's next renewal fails and every later token is above its own, so its late
    writes are refused by a fenced resource.
    """
    if not force:
        raise click.UsageError(
            "unlock takes the lock from a holder that may still run; add --force"
        )
    with _errors():
        check_name(name, "lock")
        loaded = _load(config, with_jobs=False)
        backend = loaded.open_backend()
        try:
            holder = backend.holder(name)
            counter = backend.evict(name, token_above)
        finally:
            backend.close()
    evicted = f"evicted {holder.owner} (token {holder.token})" if holder else "it was free"
    click.echo(f"unlocked {name}: {evicted}; the next token will be above {counter}")


@main.command()
@CONFIG
def migrate(config: Path) -> None:
    """Create or upgrade the backend's schema now, for teams that run migrations themselves.

    Only PostgreSQL keeps a schema; every other backend creates its state on first use.
    """
    with _errors():
        loaded = _load(config, with_jobs=False)
        url = loaded.backend_url
        if scheme(url) not in ("postgresql", "postgres"):
            click.echo(f"nothing to migrate: {scheme(url)}:// creates its state on first use")
            return
        from singleton.backends.postgres import migrate as run_migration

        click.echo(run_migration(url, **loaded.settings.backend.options))


if __name__ == "__main__":
    main()
