"""The configuration file: YAML, checked strictly, with environment overrides.

Why so strict: a misspelled key that is silently dropped (``lock_tll: 9m``) is a job that
runs with the default TTL in production. So unknown keys and duplicate YAML keys are errors
(PyYAML would keep the last duplicate without a word), a duration needs its unit, and every
error is one line naming the file, the line and the key.

Environment variables override the file: prefix ``SINGLETON_``, ``__`` between levels, e.g.
``SINGLETON_JOBS__COMPACT__LOCK_TTL=9m`` (pydantic-settings; names are matched in lower case).
"""

from __future__ import annotations

import difflib
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from singleton.durations import parse_duration
from singleton.errors import ConfigError
from singleton.urls import redact

MAX_CONFIG_BYTES = 1 << 20


def _duration(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"duration {value!r} has no unit: write {value}s or {value}ms")
    try:
        return parse_duration(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None


#: A year: longer is a typo (and ``.inf`` is not a duration).
_LONGEST = 366 * 86400.0
Duration = Annotated[float, BeforeValidator(_duration), Field(ge=0, le=_LONGEST)]
PositiveDuration = Annotated[float, BeforeValidator(_duration), Field(gt=0, le=_LONGEST)]
Mode = Literal["efficiency", "singleton", "ownership"]
Overlap = Literal["skip", "buffer_one", "buffer_all", "cancel_other", "allow"]
Catchup = Literal["none", "latest", "all"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobSettings(_Strict):
    """Per-job settings that ``defaults:`` may also set. Unset fields fall back to
    ``defaults:``, then to :data:`BUILTIN_DEFAULTS`."""

    timezone: str | None = None
    mode: Mode | None = None
    lock_ttl: PositiveDuration | None = None
    lock_at_least_for: Duration | None = None
    misfire_grace: PositiveDuration | None = None
    jitter: Duration | None = None
    max_attempts: Annotated[int, Field(ge=1, le=100)] | None = None
    retry_backoff: Duration | None = None
    on_orphan: Literal["rerun", "skip"] | None = None
    overlap: Overlap | None = None
    catchup: Catchup | None = None
    catchup_window: PositiveDuration | None = None
    pause_on_failure: Annotated[int, Field(ge=1, le=1000)] | None = None
    timeout: PositiveDuration | None = None
    output_limit: Annotated[int, Field(ge=1024, le=64 << 20)] | None = None
    env: dict[str, str] | None = None
    cwd: Path | None = None


BUILTIN_DEFAULTS = JobSettings.model_validate(
    {
        "timezone": "UTC",
        "mode": "singleton",
        "lock_ttl": "30s",
        "lock_at_least_for": "0s",
        "misfire_grace": "60s",
        "jitter": "0s",
        "max_attempts": 1,
        "retry_backoff": "10s",
        "on_orphan": "rerun",
        "overlap": "skip",
        "catchup": "none",
        "output_limit": 64 << 10,
        "env": {},
    }
)


class HttpConfig(_Strict):
    """``http:``: a request to the application per firing (sidecar mode)."""

    url: Annotated[str, Field(pattern=r"^https?://")]
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str] = {}
    timeout: PositiveDuration = 30.0
    body: str | None = None


class JobConfig(JobSettings):
    """One job: a schedule, a target and its settings. A job defined by the ``@job``
    decorator may appear here without a target to override its settings."""

    cron: str | None = None
    every: PositiveDuration | None = None
    at: datetime | None = None
    anchor: datetime | None = None
    call: str | None = None
    command: list[str] | None = Field(default=None, min_length=1)
    http: HttpConfig | None = None


class BackendConfig(BaseModel):
    """``backend:``: the URL, the ledger's retention, and options of that backend."""

    model_config = ConfigDict(extra="allow", frozen=True)

    url: str = "sqlite:///singleton.db"
    ledger_retention: PositiveDuration = 30 * 86400.0
    ledger_keep: Annotated[int, Field(ge=1)] = 10_000

    @property
    def options(self) -> dict[str, Any]:
        """Backend-specific keys, checked by the backend itself when it is opened."""
        return dict(self.model_extra or {})


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class ServerConfig(_Strict):
    listen: str | None = None


class SentryConfig(_Strict):
    """``sentry:``; the DSN may also come from ``SENTRY_DSN``."""

    dsn: str | None = None
    environment: str | None = None
    crons: bool = True


class Settings(BaseSettings):
    """The whole file, after environment overrides."""

    # Defaults are trusted values in seconds; validating them would refuse their lack of unit.
    model_config = SettingsConfigDict(
        env_prefix="SINGLETON_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=False,
    )

    replica_id: str | None = None
    backend: BackendConfig = BackendConfig()
    defaults: JobSettings = JobSettings()
    jobs: dict[str, JobConfig] = {}
    jobs_modules: list[str] = []
    shutdown_grace: Duration = 30.0
    kill_grace: Duration = 5.0
    max_skew: PositiveDuration = 2.0
    server: ServerConfig = ServerConfig()
    sentry: SentryConfig = SentryConfig()
    logging: LoggingConfig = LoggingConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment wins over the file (given as init values), so an operator can
        change one key of a deployed file without editing it."""
        return env_settings, init_settings


class Lines(dict[tuple[str, ...], int]):
    """Key path → line number in the YAML file, to point an error at its line."""

    def find(self, path: tuple[str, ...]) -> int | None:
        while path:
            if path in self:
                return self[path]
            path = path[:-1]
        return None


def _walk(node: yaml.Node, path: tuple[str, ...], lines: Lines, source: str) -> None:
    """Record line numbers and refuse duplicate keys, which PyYAML would silently merge."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{source}:{line}: duplicate key {'.'.join((*path, key))!r}"
                    f" (first at line {seen[key]})"
                )
            seen[key] = line
            lines[(*path, key)] = line
            _walk(value_node, (*path, key), lines, source)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, (*path, str(index)), lines, source)


class _Loader(yaml.SafeLoader):
    """A safe loader whose value errors (``2026-04-31``) carry the line of their node."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(None, None, str(exc), node.start_mark) from None


def read_yaml(path: Path) -> tuple[dict[str, Any], Lines]:
    """The file as a mapping, with its line map; every way it can be unreadable is one line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {len(raw)} bytes; a config file is at most 1 MiB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 (byte {exc.start})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if node is None:
        raise ConfigError(f"{path}: empty config; it needs at least a 'jobs:' mapping")
    lines = Lines()
    _walk(node, (), lines, str(path))
    try:
        data = _Loader("").construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: cannot read a value: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys, not {type(data).__name__}"
        )
    if "jobs" in data and not isinstance(data["jobs"], dict):
        line = lines.find(("jobs",))
        raise ConfigError(f"{path}:{line}: jobs must be a mapping keyed by job name")
    return data, lines


def _known_keys(path: tuple[str, ...]) -> list[str]:
    fields = {
        0: Settings.model_fields,
        "backend": BackendConfig.model_fields,
        "defaults": JobSettings.model_fields,
        "jobs": JobConfig.model_fields,
        "logging": LoggingConfig.model_fields,
        "server": ServerConfig.model_fields,
    }
    key: str | int = 0 if len(path) == 1 else path[0]
    return list(fields.get(key, {}))


def explain(exc: ValidationError, source: str, lines: Lines) -> ConfigError:
    """One line from pydantic's errors: where, which key, what is wrong."""
    errors = exc.errors()
    first = errors[0]
    path = tuple(str(part) for part in first["loc"])
    line = lines.find(path)
    where = f"{source}:{line}" if line else source
    key = ".".join(path)
    if first["type"] == "extra_forbidden":
        hint = difflib.get_close_matches(path[-1], _known_keys(path), n=1)
        message = f"unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    else:
        message = f"{key}: {first['msg'].removeprefix('Value error, ')}"
        if first["type"] not in ("value_error", "missing") and "input" in first:
            message += f" (got {redact(repr(first['input']))})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ConfigError(f"{where}: {message}{more}")


def load_settings(path: Path) -> tuple[Settings, Path, Lines]:
    """The validated settings of the file at ``path`` (with the environment's overrides), the
    folder that relative paths in it start from, and its line map for later errors."""
    path = path.expanduser()
    data, lines = read_yaml(path)
    try:
        settings = Settings(**data)
    except ValidationError as exc:
        raise explain(exc, str(path), lines) from None
    except SettingsError as exc:
        raise ConfigError(
            f"environment: {exc} (a list or mapping set from the environment is JSON,"
            """ e.g. SINGLETON_JOBS_MODULES='["jobs.nightly"]')"""
        ) from None
    return settings, path.resolve().parent, lines
