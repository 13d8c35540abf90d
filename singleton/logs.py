"""Log lines for people (``text``) and for log pipelines (``json``), one per state change."""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

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


#: How long a flush (at exit, or a second signal) waits for the writer.
FLUSH_TIMEOUT = 2.0


class BackgroundWriter(logging.Handler):
    """Formats each line in the thread that logs it and leaves the writing to one thread,
    which writes whatever has queued up in one call.

    Why not ``logging.StreamHandler``: it formats, writes and flushes under one lock, and a
    thread that gives up the GIL in the write must win it back before it lets go. With
    thousands of firings at once (five lines each), every line waited for a turn of the GIL
    and the firings queued on the lock: half of a burst's samples were in
    ``Handler.acquire``. Why not the standard ``QueueListener``: it writes a record at a
    time, so under the same load its thread falls minutes behind. Lines keep their order;
    :meth:`flush` waits until what was logged before it is written.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self._stream = stream
        self._lines: queue.SimpleQueue[str | threading.Event | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self._writer.start()

    def handle(self, record: logging.LogRecord) -> bool:
        """No handler lock: formatting needs none, and the queue orders the lines."""
        if not self.filter(record):
            return False
        self.emit(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.put(self.format(record))
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        if self._writer.is_alive():
            written = threading.Event()
            self._lines.put(written)
            written.wait(FLUSH_TIMEOUT)

    def close(self) -> None:
        if self._writer.is_alive():
            self._lines.put(None)
            self._writer.join(FLUSH_TIMEOUT)
        super().close()

    def _write(self) -> None:
        while True:
            item = self._lines.get()
            lines: list[str] = []
            marks: list[threading.Event] = []
            while True:
                if item is None:
                    self._emit(lines, marks)
                    return
                if isinstance(item, threading.Event):
                    marks.append(item)
                else:
                    lines.append(item)
                try:
                    item = self._lines.get_nowait()
                except queue.Empty:
                    break
            self._emit(lines, marks)

    def _emit(self, lines: list[str], marks: list[threading.Event]) -> None:
        try:
            if lines:
                self._stream.write("\n".join(lines) + "\n")
                self._stream.flush()
        except Exception:
            # Nowhere left to say it (stderr closed or gone): drop the lines, keep going.
            pass
        for mark in marks:
            mark.set()


def flush() -> None:
    """Write out every line logged so far: before a line printed straight to stderr (the
    CLI's last word) or an ``os._exit``, which the writer thread would otherwise race."""
    for handler in logging.getLogger("singleton").handlers:
        handler.flush()


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send singleton's logs to stderr in ``fmt``; idempotent, so tests may call it again."""
    handler = BackgroundWriter(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("singleton")
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
