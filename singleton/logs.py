"""Log lines for people (``text``) and for log pipelines (``json``), one per state change."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

from singleton.clock import iso_z


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time``, ``level``, ``logger``, ``message`` and the event's
    fields (job, run_id, token, replica …) at the top level, so a query needs no parsing."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": iso_z(datetime.fromtimestamp(record.created, UTC), millis=True),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``time level message key=value …``: readable, and still greppable by key."""

    def format(self, record: logging.LogRecord) -> str:
        when = iso_z(datetime.fromtimestamp(record.created, UTC), millis=True)
        pairs = " ".join(
            f"{key}={_quote(value)}" for key, value in _fields(record).items() if key != "event"
        )
        text = f"{when} {record.levelname.lower():<7} {record.getMessage()}"
        if pairs:
            text += " " + pairs
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def _quote(value: object) -> str:
    text = str(value)
    return json.dumps(text) if not text or any(c in text for c in ' "=\n') else text


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send singleton's logs to stderr in ``fmt``; idempotent, so tests may call it again."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("singleton")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
