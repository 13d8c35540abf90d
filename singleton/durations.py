"""Durations as people write them in YAML and on the command line: ``500ms``, ``30s``, ``1h30m``."""

from __future__ import annotations

import re
from datetime import timedelta

from singleton.errors import ConfigError

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(value: object) -> float:
    """Seconds from ``"1h30m"``, a ``timedelta`` or a number of seconds.

    A bare number in text (``"500"``) is refused: a YAML ``lock_ttl: 500`` meant as
    milliseconds would otherwise become eight minutes without a word.
    """
    if isinstance(value, bool):
        raise ConfigError(f"expected a duration such as 30s, got {value!r}")
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"expected a duration such as 30s, got {value!r}")
    text = value.strip().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        raise ConfigError(f"duration {value!r} has no unit: write {text}s or {text}ms")
    pos, total = 0, 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ConfigError(
            f"bad duration {value!r}: use units ms, s, m, h, d as in 500ms, 30s, 1h30m"
        )
    return total


def format_duration(seconds: float) -> str:
    """The shortest exact text for ``seconds`` in the units :func:`parse_duration` reads."""
    if seconds < 1 and seconds != 0:
        return f"{seconds * 1000:g}ms"
    rest = round(seconds, 3)
    parts = []
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if rest >= size:
            count = int(rest // size)
            parts.append(f"{count}{unit}")
            rest = round(rest - count * size, 3)
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)
