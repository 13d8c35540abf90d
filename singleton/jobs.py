"""Jobs: the ``@job`` decorator and the resolved job the runner works with.

A job's settings come from, in order of precedence: its YAML entry, the decorator, the
file's ``defaults:``, then :data:`~singleton.config.BUILTIN_DEFAULTS`. Resolution happens
once at start, so every mistake is found before anything is acquired.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from singleton.config import BUILTIN_DEFAULTS, JobConfig, JobSettings, Settings
from singleton.durations import format_duration
from singleton.errors import ConfigError
from singleton.schedule import Schedule, at_schedule, cron_schedule, every_schedule, zone
from singleton.targets import CallTarget, CommandTarget, Target, load_callable

NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
SCHEDULE_KEYS = ("cron", "every", "at")
TARGET_KEYS = ("call", "command", "http")
#: The most firings one start may catch up (``catchup: all``), and one backfill may run.
MAX_CATCHUP = 1000

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class _Registered:
    config: JobConfig
    func: Callable[..., Any]


_REGISTRY: dict[str, _Registered] = {}


def check_name(name: str, where: str = "job") -> str:
    """Job and lock names share one namespace and end up in keys, paths and run IDs."""
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(
            f"{where} name {name!r}: allowed characters are A-Z a-z 0-9 . _ - (1 to 128)"
        )
    return name


def job(name: str | None = None, **settings: Any) -> Callable[[F], F]:
    """Register the decorated function as a job, e.g. ``@job(cron="30 2 * * *")``.

    Keyword arguments are the YAML keys of a job (``every="2s"``, ``mode="ownership"`` …).
    The function receives the :class:`~singleton.context.JobContext` if it takes an
    argument. A YAML job of the same name overrides these settings.
    """

    def register(func: F) -> F:
        job_name = check_name(name or func.__name__)
        try:
            config = JobConfig(**settings)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ConfigError(f"@job {job_name!r}: {where}: {first['msg']}") from None
        _REGISTRY[job_name] = _Registered(config, func)
        return func

    return register


@dataclass(frozen=True)
class Job:
    """A job with every setting decided: what the runner schedules and fires."""

    name: str
    schedule: Schedule
    target: Target
    mode: str
    timezone: str
    lock_ttl: float
    lock_at_least_for: float
    misfire_grace: float
    jitter: float
    max_attempts: int
    retry_backoff: float
    on_orphan: str
    overlap: str
    catchup: str
    catchup_window: float
    pause_on_failure: int | None
    timeout: float | None
    output_limit: int


def _merge(*layers: JobSettings) -> dict[str, Any]:
    """Later layers win, key by key, but only for keys they set."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update({key: getattr(layer, key) for key in layer.model_fields_set})
    return merged


def _one_of(values: dict[str, Any], keys: tuple[str, ...], what: str, name: str) -> str:
    given = [key for key in keys if values.get(key) is not None]
    if len(given) != 1:
        which = " and ".join(given) if given else "none"
        raise ConfigError(f"jobs.{name}: needs exactly one {what} ({', '.join(keys)}), got {which}")
    return given[0]


def _schedule(values: dict[str, Any], name: str) -> Schedule:
    kind = _one_of(values, SCHEDULE_KEYS, "schedule", name)
    if values.get("anchor") is not None and kind != "every":
        raise ConfigError(f"jobs.{name}.anchor: only an 'every' schedule has an anchor")
    try:
        if kind == "cron":
            return cron_schedule(values["cron"], values["timezone"])
        if kind == "every":
            anchor = values.get("anchor")
            if anchor is not None and anchor.tzinfo is None:
                raise ConfigError("anchor needs a timezone (Z or +01:00)")
            return every_schedule(values["every"], anchor)
        if values["at"].tzinfo is None:
            raise ConfigError("at needs a timezone (Z or +01:00)")
        return at_schedule(values["at"])
    except ConfigError as exc:
        raise ConfigError(f"jobs.{name}.{kind}: {exc}") from None


def _target(
    values: dict[str, Any],
    name: str,
    func: Callable[..., Any] | None,
    base: Path,
    kill_grace: float,
) -> Target:
    if func is not None:
        if any(values.get(key) is not None for key in TARGET_KEYS):
            raise ConfigError(
                f"jobs.{name}: is defined by @job in code and cannot also set call, command or http"
            )
        return CallTarget(func, name)
    kind = _one_of(values, TARGET_KEYS, "target", name)
    if kind == "http":
        from singleton.http_target import from_config

        return from_config(values["http"].model_dump())
    if kind == "call":
        try:
            return CallTarget(load_callable(values["call"]), name)
        except ConfigError as exc:
            raise ConfigError(f"jobs.{name}.call: {exc}") from None
    cwd = values.get("cwd")
    return CommandTarget(
        values["command"],
        env=values["env"],
        cwd=(base / cwd) if cwd is not None else base,
        output_limit=values["output_limit"],
        kill_grace=kill_grace,
    )


def import_modules(modules: list[str], base: Path) -> None:
    """Import ``jobs_modules`` with the config's folder on ``sys.path``, so a config next to
    a ``jobs/`` package finds it wherever the process was started."""
    if str(base) not in sys.path:
        sys.path.insert(0, str(base))
    for module in modules:
        try:
            importlib.import_module(module)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(
                f"jobs_modules: cannot import {module!r}: {type(exc).__name__}: {exc}"
            ) from None


def resolve(settings: Settings, base: Path) -> dict[str, Job]:
    """Every job of the config and of the imported ``jobs_modules``, fully decided."""
    import_modules(settings.jobs_modules, base)
    names = list(dict.fromkeys([*settings.jobs, *_REGISTRY]))
    return {name: _resolve_one(name, settings, base) for name in names}


def _resolve_one(name: str, settings: Settings, base: Path) -> Job:
    check_name(name, "jobs:")
    yaml_job = settings.jobs.get(name)
    registered = _REGISTRY.get(name)
    layers: list[JobSettings] = [BUILTIN_DEFAULTS, settings.defaults]
    if registered is not None:
        code = registered.config
        if yaml_job is not None and any(key in yaml_job.model_fields_set for key in SCHEDULE_KEYS):
            code = code.model_copy(update=dict.fromkeys(SCHEDULE_KEYS))
        layers.append(code)
    if yaml_job is not None:
        layers.append(yaml_job)
    values = _merge(*layers)
    try:
        zone(values["timezone"])
    except ConfigError as exc:
        raise ConfigError(f"jobs.{name}.timezone: {exc}") from None
    if values["jitter"] >= values["lock_ttl"]:
        raise ConfigError(f"jobs.{name}.jitter: must be shorter than lock_ttl")
    if values["lock_at_least_for"] > values["lock_ttl"]:
        raise ConfigError(f"jobs.{name}.lock_at_least_for: must not be longer than lock_ttl")
    if values["overlap"] == "allow" and values["mode"] != "efficiency":
        raise ConfigError(
            f"jobs.{name}.overlap: 'allow' runs firings side by side, which only mode"
            f" efficiency permits (mode is {values['mode']})"
        )
    catchup_window = values.get("catchup_window") or values["misfire_grace"]
    if catchup_window > settings.backend.ledger_retention:
        raise ConfigError(
            f"jobs.{name}.catchup_window: {format_duration(catchup_window)} is longer than"
            f" backend.ledger_retention ({format_duration(settings.backend.ledger_retention)}):"
            " the ledger could not tell which of those firings ran"
        )
    job = Job(
        name=name,
        schedule=_schedule(values, name),
        target=_target(
            values, name, registered.func if registered else None, base, settings.kill_grace
        ),
        mode=values["mode"],
        timezone=values["timezone"],
        lock_ttl=values["lock_ttl"],
        lock_at_least_for=values["lock_at_least_for"],
        misfire_grace=values["misfire_grace"],
        jitter=values["jitter"],
        max_attempts=values["max_attempts"],
        retry_backoff=values["retry_backoff"],
        on_orphan=values["on_orphan"],
        overlap=values["overlap"],
        catchup=values["catchup"],
        catchup_window=catchup_window,
        pause_on_failure=values.get("pause_on_failure"),
        timeout=values.get("timeout"),
        output_limit=values["output_limit"],
    )
    period = job.schedule.min_period
    if job.catchup == "all" and period and catchup_window / period > MAX_CATCHUP:
        raise ConfigError(
            f"jobs.{name}.catchup_window: {format_duration(catchup_window)} holds up to"
            f" {catchup_window / period:.0f} firings of this schedule; 'catchup: all' runs at"
            f" most {MAX_CATCHUP}"
        )
    return job
