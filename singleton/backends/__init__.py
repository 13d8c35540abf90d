"""Backends by URL scheme, imported only when used.

A backend's optional client library (redis, kazoo, psycopg …) is imported when its URL is
opened, so ``singleton`` starts fast and a missing extra is one clear error. Third-party
backends join through the ``singleton.backends`` entry point group or :func:`register`.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, cast

from singleton.backends.base import Backend
from singleton.errors import ConfigError
from singleton.urls import redact, scheme

Factory = Callable[..., Backend]

#: scheme → (module, class, the extra that installs its client library)
_BUILTIN: dict[str, tuple[str, str, str | None]] = {
    "memory": ("singleton.backends.memory", "MemoryBackend", None),
    "sqlite": ("singleton.backends.sqlite", "SqliteBackend", None),
    "redis": ("singleton.backends.redis", "RedisBackend", "redis"),
    "rediss": ("singleton.backends.redis", "RedisBackend", "redis"),
    "unix": ("singleton.backends.redis", "RedisBackend", "redis"),
    "redlock": ("singleton.backends.redlock", "RedlockBackend", "redis"),
    "zookeeper": ("singleton.backends.zookeeper", "ZookeeperBackend", "zookeeper"),
    "etcd": ("singleton.backends.etcd", "EtcdBackend", "etcd"),
    "postgresql": ("singleton.backends.postgres", "PostgresBackend", "postgres"),
    "postgres": ("singleton.backends.postgres", "PostgresBackend", "postgres"),
}
_REGISTERED: dict[str, Factory] = {}


def register(url_scheme: str, factory: Factory) -> None:
    """Make ``url_scheme://`` open with ``factory(url, **options)``."""
    _REGISTERED[url_scheme.lower()] = factory


def schemes() -> list[str]:
    """Every scheme that can be opened, for error messages."""
    found = {ep.name for ep in entry_points(group="singleton.backends")}
    return sorted(set(_BUILTIN) | set(_REGISTERED) | found)


def _factory(url: str) -> Factory:
    kind = scheme(url)
    if kind in _REGISTERED:
        return _REGISTERED[kind]
    if kind in _BUILTIN:
        module, name, extra = _BUILTIN[kind]
        try:
            return cast(Factory, getattr(importlib.import_module(module), name))
        except ImportError as exc:
            if (exc.name or "").startswith("singleton"):
                raise ConfigError(f"backend {kind}:// is not available in this version") from exc
            hint = f": pip install 'singleton-runner[{extra}]'" if extra else ""
            raise ConfigError(f"backend {kind}:// needs {exc.name}{hint}") from exc
    for ep in entry_points(group="singleton.backends", name=kind):
        return cast(Factory, ep.load())
    raise ConfigError(
        f"backend.url {redact(url)!r}: unknown scheme {kind + '://' if kind else '(none)'};"
        f" known: {', '.join(s + '://' for s in schemes())}"
    )


def open_backend(url: str, **options: Any) -> Backend:
    """The backend for ``url``, given its backend-specific ``options`` from the config."""
    factory = _factory(url)
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(options) - set(params)) if not takes_any else []
    if unknown:
        allowed = sorted(n for n in params if n not in ("self", "url", "clock"))
        raise ConfigError(
            f"backend: unknown option {unknown[0]!r} for {scheme(url)}://"
            f" (allowed: {', '.join(allowed) or 'none'})"
        )
    return factory(url, **options)
