"""Targets with real functions, real event loops and real processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from singleton.context import JobContext
from singleton.errors import ConfigError
from singleton.targets import CallTarget, CommandTarget, Result, load_callable
from tests.replicas import alive

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def make_ctx() -> JobContext:
    return JobContext(
        job="j",
        run_id="j@2026-12-01T01:30:00Z",
        attempt=1,
        scheduled_at=datetime(2026, 12, 1, 1, 30, tzinfo=UTC),
        token=7,
        replica_id="r1",
    )


@contextmanager
def cancel_when(ctx: JobContext, ready: Callable[[], bool]) -> Iterator[list[float]]:
    """Set ``ctx.cancel`` from another thread as soon as ``ready()`` holds; yields a list
    that receives the monotonic time of the cancel."""
    cancelled_at: list[float] = []

    def watch() -> None:
        while not ready():
            time.sleep(0.01)
        cancelled_at.append(time.monotonic())
        ctx.cancel.set("timed_out")

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    yield cancelled_at
    thread.join(5)


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- call targets -------------------------------------------------------------------------


def test_call_passes_the_context_to_a_function_with_a_parameter() -> None:
    seen: list[JobContext] = []
    ctx = make_ctx()
    assert CallTarget(seen.append, "j").run(ctx) == Result(ok=True)
    assert seen == [ctx]


def test_call_runs_a_function_without_parameters_with_no_arguments() -> None:
    calls: list[str] = []
    assert CallTarget(lambda: calls.append("ran"), "j").run(make_ctx()) == Result(ok=True)
    assert calls == ["ran"]


def test_call_exception_is_a_failed_result_with_the_type() -> None:
    def boom() -> None:
        raise ValueError("boom")

    assert CallTarget(boom, "j").run(make_ctx()) == Result(ok=False, error="ValueError: boom")


def test_call_exception_is_logged_with_job_and_run_id(caplog: pytest.LogCaptureFixture) -> None:
    def boom() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="singleton.targets"):
        CallTarget(boom, "j").run(make_ctx())
    (record,) = caplog.records
    assert record.exc_info is not None
    assert record.__dict__["fields"] == {"job": "j", "run_id": "j@2026-12-01T01:30:00Z"}


def test_call_lease_lost_from_check_is_a_failed_result() -> None:
    ctx = make_ctx()
    ctx.cancel.set("lost_lease")
    result = CallTarget(JobContext.check, "j").run(ctx)
    assert not result.ok
    assert result.error is not None and result.error.startswith("LeaseLost: ")


def test_call_async_function_runs_in_its_own_loop() -> None:
    async def job(ctx: JobContext) -> None:
        await asyncio.sleep(0)
        assert ctx.token == 7

    assert CallTarget(job, "j").run(make_ctx()) == Result(ok=True)


def test_call_async_function_is_cancelled_by_ctx_cancel() -> None:
    started = threading.Event()

    async def job() -> None:
        started.set()
        await asyncio.sleep(30)

    ctx = make_ctx()
    begin = time.monotonic()
    with cancel_when(ctx, started.is_set):
        result = CallTarget(job, "j").run(ctx)
    assert result == Result(ok=False, error="cancelled")
    assert time.monotonic() - begin < 2


def test_load_callable_finds_a_function() -> None:
    assert load_callable("os.path:join") is os.path.join


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("jobs.x", "call 'jobs.x': expected package.module:function"),
        (
            "no_such_pkg_zz.x:run",
            "cannot import no_such_pkg_zz.x: No module named 'no_such_pkg_zz'",
        ),
        ("os:no_such_function", "os has no attribute 'no_such_function'"),
        ("os:sep", "call 'os:sep': sep is not callable"),
    ],
)
def test_load_callable_explains_a_bad_spec_in_one_line(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        load_callable(spec)
    assert "\n" not in str(info.value)


# --- command targets ----------------------------------------------------------------------


def test_command_env_has_the_singleton_contract() -> None:
    script = "import os, json; print(json.dumps(dict(os.environ)))"
    result = CommandTarget([PY, "-c", script]).run(make_ctx())
    env = json.loads(result.output)
    assert {key: value for key, value in env.items() if key.startswith("SINGLETON_")} == {
        "SINGLETON_JOB": "j",
        "SINGLETON_RUN_ID": "j@2026-12-01T01:30:00Z",
        "SINGLETON_ATTEMPT": "1",
        "SINGLETON_FENCING_TOKEN": "7",
        "SINGLETON_SCHEDULED_AT": "2026-12-01T01:30:00Z",
        "SINGLETON_REPLICA_ID": "r1",
    }


def test_command_honours_cwd_and_env(tmp_path: Path) -> None:
    script = "import os; print(os.getcwd()); print(os.environ['GREETING'])"
    target = CommandTarget([PY, "-c", script], env={"GREETING": "hello"}, cwd=tmp_path)
    result = target.run(make_ctx())
    assert result.ok
    cwd, greeting = result.output.splitlines()
    assert Path(cwd).resolve() == tmp_path.resolve()
    assert greeting == "hello"


def test_command_exit_code_is_the_error_with_the_output_tail() -> None:
    result = CommandTarget(["sh", "-c", "echo oops; exit 3"]).run(make_ctx())
    assert result == Result(ok=False, error="exit 3 | oops", output="oops\n")


def test_command_not_found_is_a_failed_result() -> None:
    result = CommandTarget(["no-such-command-zz"]).run(make_ctx())
    assert result == Result(ok=False, error="command not found: no-such-command-zz")


def test_command_output_is_truncated_without_deadlock() -> None:
    ten_mb = 10 * 1024 * 1024
    script = (
        f"head -c {ten_mb} /dev/zero | tr '\\0' a & "
        f"head -c {ten_mb} /dev/zero | tr '\\0' b >&2; wait"
    )
    begin = time.monotonic()
    result = CommandTarget(["sh", "-c", script], output_limit=1000).run(make_ctx())
    assert time.monotonic() - begin < 5
    assert result.ok
    kept, marker = result.output.split("\n")
    assert len(kept) == 1000
    assert set(kept) <= {"a", "b"}
    assert marker.startswith(f"[output truncated: {2 * ten_mb} bytes in all, kept 1000, sha256 ")


def test_command_output_replaces_invalid_utf8_and_nul() -> None:
    script = "import sys; sys.stdout.buffer.write(b'a\\xffb\\x00c')"
    result = CommandTarget([PY, "-c", script]).run(make_ctx())
    assert result.output == "a\ufffdb\ufffdc"


def test_command_is_terminated_when_cancelled(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ctx = make_ctx()
    target = CommandTarget(["sh", "-c", "touch ready; exec sleep 30"], cwd=tmp_path)
    with cancel_when(ctx, ready.exists) as cancelled_at:
        result = target.run(ctx)
        stopped = time.monotonic()
    assert result == Result(ok=False, error="killed by SIGTERM")
    assert stopped - cancelled_at[0] < 0.5


def test_command_endless_output_is_bounded_until_cancelled() -> None:
    ctx = make_ctx()
    begin = time.monotonic()
    with cancel_when(ctx, lambda: time.monotonic() - begin > 0.3):
        result = CommandTarget(["yes"], output_limit=100).run(ctx)
    assert result.error is not None and result.error.startswith("killed by SIGTERM | y\ny\n")
    assert len(result.output) < 300
    assert "[output truncated: " in result.output


def test_command_ignoring_sigterm_is_killed_after_kill_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    script = 'trap "" TERM; touch ready; sleep 30'
    target = CommandTarget(["sh", "-c", script], cwd=tmp_path, kill_grace=0.5)
    ctx = make_ctx()
    with cancel_when(ctx, ready.exists) as cancelled_at:
        result = target.run(ctx)
        stopped = time.monotonic()
    assert result == Result(ok=False, error="killed by SIGKILL")
    assert 0.45 <= stopped - cancelled_at[0] < 1.5


def test_command_background_grandchild_is_killed_after_the_run() -> None:
    result = CommandTarget(["sh", "-c", "sleep 30 & echo $!"]).run(make_ctx())
    assert result.ok
    assert gone_within(int(result.output), 2)


RUNNER = """
import sys
from datetime import UTC, datetime
from singleton.context import JobContext
from singleton.targets import CommandTarget

ctx = JobContext("j", "j@2026-12-01T01:30:00Z", 1, datetime.now(UTC), 7, "r1")
CommandTarget(["sh", "-c", "echo $$ > " + sys.argv[1] + "; exec sleep 30"]).run(ctx)
"""


def test_command_dies_with_a_sigkilled_runner(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    runner = subprocess.Popen(
        [PY, "-c", RUNNER, str(pidfile)], env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists() or not pidfile.read_text().strip():
            assert time.monotonic() < deadline, "the runner never started its command"
            time.sleep(0.02)
        pid = int(pidfile.read_text())
        assert alive(pid)
    finally:
        runner.send_signal(signal.SIGKILL)
        runner.wait()
    assert gone_within(pid, 2)
