"""Log lines: formatted by the thread that logs, written in order by one writer thread, so a
burst of firings never queues on a lock held across a write."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from singleton.logs import BackgroundWriter, JsonFormatter, TextFormatter


class GatedStream(io.StringIO):
    """A stream whose writes block until ``gate`` is set (a slow terminal, a full pipe)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def write(self, text: str) -> int:
        self.gate.wait(10)
        return super().write(text)


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("stderr is gone")


@contextmanager
def logger_to(stream: io.StringIO, formatter: logging.Formatter) -> Iterator[logging.Logger]:
    handler = BackgroundWriter(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-logs-{id(handler)}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger
    finally:
        handler.close()
        logger.handlers.clear()


def flush(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        handler.flush()


def test_flush_returns_once_every_earlier_line_is_written() -> None:
    stream = io.StringIO()
    with logger_to(stream, TextFormatter()) as logger:
        logger.info("claimed", extra={"fields": {"job": "bill", "token": 7}})
        flush(logger)
        written = stream.getvalue()
    assert written.endswith("claimed job=bill token=7\n")


def test_lines_from_many_threads_are_all_written_each_thread_in_its_order() -> None:
    stream = io.StringIO()
    with logger_to(stream, TextFormatter()) as logger:

        def log_lines(name: str) -> None:
            for n in range(200):
                logger.info("line", extra={"fields": {"thread": name, "n": n}})

        threads = [threading.Thread(target=log_lines, args=(f"t{i}",)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        flush(logger)
        lines = stream.getvalue().splitlines()
    assert len(lines) == 8 * 200
    for i in range(8):
        numbers = [int(line.split("n=")[1]) for line in lines if f"thread=t{i} " in line]
        assert numbers == list(range(200))


def test_a_slow_stream_does_not_hold_up_the_thread_that_logs() -> None:
    stream = GatedStream()
    with logger_to(stream, TextFormatter()) as logger:
        stream.gate.clear()
        logger.info("first")  # the writer now waits in this write
        logged = threading.Event()

        def burst() -> None:
            for n in range(100):
                logger.info("queued", extra={"fields": {"n": n}})
            logged.set()

        threading.Thread(target=burst, daemon=True).start()
        assert logged.wait(5), "logging waited for the stream"
        stream.gate.set()
        flush(logger)
        lines = stream.getvalue().splitlines()
    assert len(lines) == 101
    assert lines[-1].endswith("queued n=99")


def test_closing_writes_what_was_queued() -> None:
    stream = io.StringIO()
    with logger_to(stream, TextFormatter()) as logger:
        for n in range(50):
            logger.info("line", extra={"fields": {"n": n}})
    assert len(stream.getvalue().splitlines()) == 50


def test_a_broken_stream_loses_its_lines_but_not_the_logging_thread() -> None:
    with logger_to(BrokenStream(), TextFormatter()) as logger:
        logger.info("lost")
        flush(logger)
        logger.info("also lost")  # no exception reaches the caller


def test_a_json_line_carries_the_event_fields_at_the_top_level() -> None:
    stream = io.StringIO()
    with logger_to(stream, JsonFormatter()) as logger:
        logger.warning("lost", extra={"fields": {"job": "bill", "run_id": "bill@x", "token": 3}})
        flush(logger)
        line = json.loads(stream.getvalue())
    assert line["level"] == "warning"
    assert line["message"] == "lost"
    assert (line["job"], line["run_id"], line["token"]) == ("bill", "bill@x", 3)
