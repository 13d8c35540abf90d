"""What a firing runs: a Python callable or a command, stopped promptly when asked.

A target never raises for a job's own failure: the firing flow records every outcome in the
ledger, so a failed job, a missing executable and a cancelled run all come back as a
:class:`Result`. The caller maps ``ctx.cancel.reason`` to the ledger state; a target only
has to obey the cancel signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import inspect
import logging
import os
import select
import shlex
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, cast

from singleton.context import JobContext
from singleton.errors import ConfigError, LeaseLost
from singleton.reaper import REAPER

log = logging.getLogger("singleton.targets")

#: How much of the end of a failed command's output goes into ``Result.error``.
ERROR_TAIL = 500
_CHUNK = 65536
#: How long output may keep arriving after the job's process group is gone: only a process
#: that escaped the group (a double-forked daemon) can hold the pipe open that long.
_DRAIN_AFTER_EXIT = 1.0
_NO_ENV: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Result:
    """The outcome of one run. ``error`` is one short line, fit for the ledger and a log."""

    ok: bool
    error: str | None = None
    output: str = ""
    #: The exception a ``call`` target raised, for error reporting (Sentry); not logged.
    exception: BaseException | None = field(default=None, repr=False, compare=False)


class Target(Protocol):
    """Anything a job can run; the firing flow depends on nothing else."""

    def run(self, ctx: JobContext) -> Result:
        """Run once for ``ctx``'s firing; return promptly after ``ctx.cancel`` fires."""
        ...

    def describe(self) -> str:
        """One line for ``singleton jobs`` and logs."""
        ...


def load_callable(spec: str) -> Callable[..., object]:
    """The function named by a YAML ``call: package.module:function``.

    Resolved at start, so a typo ends the process with one line instead of failing every
    firing at 2 a.m.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path or ":" in attr_path:
        raise ConfigError(f"call {spec!r}: expected package.module:function")
    try:
        found: object = importlib.import_module(module_name)
    except Exception as exc:
        detail = str(exc) if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"call {spec!r}: cannot import {module_name}: {detail}") from None
    for attr in attr_path.split("."):
        if not hasattr(found, attr):
            raise ConfigError(f"call {spec!r}: {module_name} has no attribute {attr_path!r}")
        found = getattr(found, attr)
    if not callable(found):
        raise ConfigError(f"call {spec!r}: {attr_path} is not callable")
    return found


def _takes_context(func: Callable[..., object]) -> bool:
    """Whether ``func`` has a positional slot for the context; a signature we cannot read
    (some builtins) counts as none."""
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    )
    return any(param.kind in positional for param in params)


class CallTarget:
    """A Python function run in the calling thread.

    A sync function cannot be interrupted, so it should poll ``ctx.lost`` or call
    ``ctx.check()`` between steps. An ``async def`` function gets its own event loop and is
    cancelled as soon as ``ctx.cancel`` fires, so a lost lease stops it at its next await.
    """

    def __init__(self, func: Callable[..., object], name: str) -> None:
        self.func = func
        self.name = name
        self._with_context = _takes_context(func)
        self._is_async = inspect.iscoroutinefunction(func)

    def describe(self) -> str:
        module = getattr(self.func, "__module__", None) or "?"
        return f"call {module}:{getattr(self.func, '__qualname__', self.name)}"

    def run(self, ctx: JobContext) -> Result:
        """Run the function; its exception is a failed result, logged with its traceback."""
        try:
            if self._is_async:
                self._run_async(ctx)
            else:
                self._invoke(ctx)
        except asyncio.CancelledError:
            return Result(ok=False, error="cancelled")
        except LeaseLost as exc:
            log.warning("job stopped: %s", exc, extra=_fields(ctx))
            return Result(ok=False, error=f"LeaseLost: {exc}")
        except Exception as exc:
            log.exception("job raised %s", type(exc).__name__, extra=_fields(ctx))
            return Result(ok=False, error=f"{type(exc).__name__}: {exc}", exception=exc)
        return Result(ok=True)

    def _invoke(self, ctx: JobContext) -> object:
        return self.func(ctx) if self._with_context else self.func()

    def _run_async(self, ctx: JobContext) -> None:
        """Like ``asyncio.run`` (a fresh loop, closed after), plus cancellation from
        ``ctx.cancel``, which fires on another thread."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            task = loop.create_task(cast("Coroutine[Any, Any, object]", self._invoke(ctx)))
            ctx.cancel.on_set(functools.partial(_cancel_soon, loop, task))
            await task

        with asyncio.Runner() as runner:
            runner.run(main())


def _cancel_soon(loop: asyncio.AbstractEventLoop, task: asyncio.Task[object], _reason: str) -> None:
    """Cancel ``task`` from any thread. The cancel hook cannot be unregistered, so it may
    fire after the loop is closed; it must never raise into whoever set the cancel."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(task.cancel)


def _fields(ctx: JobContext) -> dict[str, Any]:
    return {"fields": {"job": ctx.job, "run_id": ctx.run_id}}


class _Output:
    """Drains a pipe on its own thread so the child never blocks on a full pipe.

    Keeps the first ``limit`` bytes and the last few hundred (for the error line), counts and
    hashes the rest, so memory stays bounded whatever the job prints.
    """

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._limit = limit
        self._kept = bytearray()
        self._tail = b""
        self._total = 0
        self._digest = hashlib.sha256()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="singleton-output", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        # The timeout only serves stop(): a process that escaped the group may never close
        # the pipe, and a thread blocked in read() could not be told to give up.
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            chunk = os.read(self._fd, _CHUNK)
            if not chunk:
                return
            self._keep(chunk)

    def _keep(self, chunk: bytes) -> None:
        self._total += len(chunk)
        self._digest.update(chunk)
        room = self._limit - len(self._kept)
        if room > 0:
            self._kept += chunk[:room]
        self._tail = (self._tail + chunk)[-ERROR_TAIL:]

    def finish(self) -> None:
        """Wait for the end of output, giving up after a grace period."""
        self._thread.join(_DRAIN_AFTER_EXIT)
        self._stop.set()
        self._thread.join()

    def text(self) -> str:
        text = _safe_text(bytes(self._kept))
        if self._total > len(self._kept):
            text += (
                f"\n[output truncated: {self._total} bytes in all, kept {len(self._kept)},"
                f" sha256 {self._digest.hexdigest()}]"
            )
        return text

    def tail(self) -> str:
        return _safe_text(self._tail).strip()


def _safe_text(data: bytes) -> str:
    """Text that any log pipeline and database column accepts: NUL is refused by some."""
    return data.decode("utf-8", errors="replace").replace("\x00", "\ufffd")


@functools.cache
def _pdeathsig_prefix() -> tuple[str, ...]:
    """``setpriv --pdeathsig KILL --`` if this host has a setpriv that knows the option.

    The kernel's parent-death signal kills the job if the runner is SIGKILLed. Setting it
    with ``prctl`` in ``preexec_fn`` would be simpler, but ``preexec_fn`` is unsafe in a
    threaded program (it runs Python between fork and exec, where another thread may have
    held a lock), so a tiny exec wrapper sets it instead. Old util-linux lacks the option.
    """
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return ()
    # No timeout: Popen.wait(timeout) polls with time.sleep, which libfaketime breaks.
    probe = subprocess.run([setpriv, "--help"], capture_output=True, text=True, check=False)
    return (setpriv, "--pdeathsig", "KILL", "--") if "--pdeathsig" in probe.stdout else ()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    # ESRCH: the group is already empty. EPERM: only members we may not signal are left
    # (a setuid program); nothing more can be done about those from here.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _exit_reason(returncode: int) -> str | None:
    if returncode == 0:
        return None
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit {returncode}"


class CommandTarget:
    """An argv list (never a shell) in its own process group.

    The group lets a stop reach every process the job started; the process group leader is
    left unreaped until the group has been killed, so its ID cannot be reused by a stranger
    in between. A job that ignores SIGTERM is SIGKILLed after ``kill_grace``.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] = _NO_ENV,
        cwd: Path | None = None,
        output_limit: int = 65536,
        kill_grace: float = 5.0,
    ) -> None:
        if not argv:
            raise ConfigError("command: needs at least the program to run")
        self.argv = tuple(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.output_limit = output_limit
        self.kill_grace = kill_grace

    def describe(self) -> str:
        return f"command {shlex.join(self.argv)}"

    def run(self, ctx: JobContext) -> Result:
        """Run the command to its end or until ``ctx.cancel``; no process is left behind."""
        env = {**os.environ, **self.env, **ctx.env()}
        problem = self._missing_program(env)
        if problem is not None:
            return Result(ok=False, error=problem)
        try:
            # This thread spawns the child and stays until it is reaped: the parent-death
            # signal fires when the spawning *thread* exits, not the process.
            proc = subprocess.Popen(
                [*_pdeathsig_prefix(), *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            return Result(ok=False, error=f"cannot start {self.argv[0]}: {exc}")
        REAPER.watch(proc.pid)
        with proc:
            assert proc.stdout is not None
            output = _Output(proc.stdout.fileno(), self.output_limit)
            try:
                self._wait(proc, ctx)
            finally:
                _signal_group(proc.pid, signal.SIGKILL)
                REAPER.forget(proc.pid)
                proc.wait()
                output.finish()
        reason = _exit_reason(proc.returncode)
        if reason is None:
            return Result(ok=True, output=output.text())
        tail = output.tail()
        error = f"{reason} | {tail}" if tail else reason
        return Result(ok=False, error=error, output=output.text())

    def _missing_program(self, env: Mapping[str, str]) -> str | None:
        """Check the program exists before spawning: behind setpriv a missing one would only
        show as exit 127, indistinguishable from the job's own exit code."""
        program = self.argv[0]
        if os.sep in program:
            path = Path(program) if self.cwd is None else self.cwd / program
            if not path.is_file():
                return f"command not found: {program}"
            return None if os.access(path, os.X_OK) else f"command not executable: {program}"
        found = shutil.which(program, path=env.get("PATH", os.defpath))
        return None if found is not None else f"command not found: {program}"

    def _wait(self, proc: subprocess.Popen[bytes], ctx: JobContext) -> None:
        """Block until the leader exits or the run is cancelled; on cancel, TERM the group
        and KILL it after ``kill_grace``. The leader is left unreaped for the caller."""
        exited = threading.Event()
        wake = threading.Event()
        threading.Thread(
            target=_await_exit, args=(proc.pid, exited, wake), name="singleton-wait", daemon=True
        ).start()
        ctx.cancel.on_set(lambda _reason: wake.set())
        wake.wait()
        if exited.is_set():
            return
        _signal_group(proc.pid, signal.SIGTERM)
        if not exited.wait(self.kill_grace):
            _signal_group(proc.pid, signal.SIGKILL)
            exited.wait()


def _await_exit(pid: int, exited: threading.Event, wake: threading.Event) -> None:
    """Wait for ``pid`` to exit without reaping it (``WNOWAIT``), so its process group ID
    stays reserved while the group is killed."""
    with contextlib.suppress(ChildProcessError):
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    exited.set()
    wake.set()
