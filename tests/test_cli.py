"""The ``singleton`` command, in-process through click's CliRunner and as a real process.

The contract (DESIGN, "Contracts other tools rely on"): exit 0 ok, 2 usage, 78 configuration
error; a user's mistake ends with one line on stderr naming the key or the problem, never a
traceback, and nothing is started. The subprocess tests cover a representative subset end to
end (console script, real environment, real exit status); CliRunner covers the whole table.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import singleton.backends
from singleton.backends.base import Capabilities
from singleton.backends.memory import MemoryBackend
from singleton.cli import main

#: The module holding the ``@job`` registry.
JOB_MODULE = importlib.import_module("singleton.jobs")
SINGLETON = Path(sys.executable).with_name("singleton")
ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
EXIT_USAGE = 2
EXIT_CONFIG = 78


def write_config(folder: Path, text: str, name: str = "singleton.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def one_error_line(stderr: str) -> str:
    """The only non-empty line of ``stderr``, after checking there is no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


def usage_error_line(stderr: str) -> str:
    """click's usage error: usage lines and exactly one ``Error:`` line, no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SINGLETON_")}


def run_cli(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed console script as a child process."""
    assert SINGLETON.exists(), f"console script not found next to the interpreter: {SINGLETON}"
    return subprocess.run(
        [str(SINGLETON), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**clean_env(), **(env or {})},
        timeout=30,
        check=False,
    )


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """What an in-process CLI run changes for the rest of the process: the environment's
    overrides, ``sys.path`` (the config folder), the ``@job`` registry, and the
    ``singleton`` logger, which ``configure`` points at the runner's captured stderr."""
    for key in list(os.environ):
        if key.startswith("SINGLETON_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(JOB_MODULE, "_REGISTRY", {})
    logger = logging.getLogger("singleton")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


# --------------------------------------------------------------------------- bad configs

#: (file text, a distinctive part of the one error line; <dir> is the config's folder)
BAD_CONFIGS = [
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    command: [x]\n    lock_tll: 9m\n",
        ":5: unknown key 'jobs.a.lock_tll' (did you mean 'lock_ttl'?)",
        id="unknown-key-in-a-job",
    ),
    pytest.param(
        "jbos: {}\n",
        ":1: unknown key 'jbos' (did you mean 'jobs'?)",
        id="unknown-top-level-key",
    ),
    pytest.param(
        "defaults:\n  misfire_grase: 3s\njobs: {}\n",
        ":2: unknown key 'defaults.misfire_grase' (did you mean 'misfire_grace'?)",
        id="unknown-key-in-defaults",
    ),
    pytest.param(
        "logging:\n  levle: debug\njobs: {}\n",
        "unknown key 'logging.levle' (did you mean 'level'?)",
        id="unknown-key-in-logging",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    every: 6s\n    command: [x]\n",
        ":4: duplicate key 'jobs.a.every' (first at line 3)",
        id="duplicate-key",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    command: [x]\n  a:\n    every: 6s\n    command: [y]\n",
        ":5: duplicate key 'jobs.a' (first at line 2)",
        id="duplicate-job-name",
    ),
    pytest.param(
        "jobs:\n  backup:\n    cron: '60 * * * *'\n    command: [x]\n",
        "jobs.backup.cron: cron '60 * * * *': minute field '60' out of range 0-59",
        id="cron-minute-out-of-range",
    ),
    pytest.param(
        "jobs:\n  backup:\n    cron: '* * 32 * *'\n    command: [x]\n",
        "day-of-month field '32' out of range 1-31",
        id="cron-day-of-month-out-of-range",
    ),
    pytest.param(
        "jobs:\n  backup:\n    cron: '* * * 13 *'\n    command: [x]\n",
        "month field '13' out of range 1-12",
        id="cron-month-out-of-range",
    ),
    pytest.param(
        "jobs:\n  backup:\n    cron: '*/0 * * * *'\n    command: [x]\n",
        "jobs.backup.cron: cron '*/0 * * * *': step must be at least 1",
        id="cron-step-zero",
    ),
    pytest.param(
        "jobs:\n  backup:\n    cron: '0 0 30 2 *'\n    command: [x]\n",
        "jobs.backup.cron: cron '0 0 30 2 *': schedule never fires",
        id="cron-never-fires",
    ),
    pytest.param(
        "jobs:\n  backup:\n    cron: '0 0 ? * *'\n    command: [x]\n",
        "'?' is Quartz syntax",
        id="cron-quartz-question-mark",
    ),
    pytest.param(
        "jobs:\n  backup:\n    cron: '@reboot'\n    command: [x]\n",
        "@reboot is not a schedule",
        id="cron-reboot",
    ),
    pytest.param(
        "jobs:\n  backup:\n    cron: '0 0 * *'\n    command: [x]\n",
        "expected 5 fields (or 6 with seconds first), got 4",
        id="cron-too-few-fields",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    command: [x]\n    lock_ttl: '500'\n",
        ":5: jobs.a.lock_ttl: duration '500' has no unit: write 500s or 500ms",
        id="duration-without-unit",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    command: [x]\n    lock_ttl: 5 minutes\n",
        "jobs.a.lock_ttl: bad duration '5 minutes'",
        id="duration-in-words",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    command: [x]\n    lock_ttl: no\n",
        "jobs.a.lock_ttl: expected a duration such as 30s, got False",
        id="duration-yaml-boolean",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 500ms\n    command: [x]\n",
        "jobs.a.every: every must be a whole number of seconds, at least 1s, got 0.5s",
        id="every-under-one-second",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 1500ms\n    command: [x]\n",
        "jobs.a.every: every must be a whole number of seconds, at least 1s, got 1.5s",
        id="every-fractional",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 0s\n    command: [x]\n",
        "jobs.a.every: Input should be greater than 0",
        id="every-zero",
    ),
    pytest.param(
        "backend:\n  url: http://h:6379\njobs: {}\n",
        "backend.url 'http://h:6379': unknown scheme http://; known: ",
        id="unknown-backend-scheme",
    ),
    pytest.param(
        "backend:\n  url: sqlite:///missing/ledger.db\njobs: {}\n",
        "backend.url: folder <dir>/missing does not exist",
        id="sqlite-folder-missing",
    ),
    pytest.param(
        "backend:\n  url: memory://\n  schema: jobs\njobs: {}\n",
        "backend: unknown option 'schema' for memory://",
        id="unknown-backend-option",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n",
        "jobs.a: needs exactly one target (call, command, http), got none",
        id="no-target",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    command: [x]\n    call: os:getcwd\n",
        "jobs.a: needs exactly one target (call, command, http), got call and command",
        id="two-targets",
    ),
    pytest.param(
        "jobs:\n  a:\n    command: [x]\n",
        "jobs.a: needs exactly one schedule (cron, every, at), got none",
        id="no-schedule",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    cron: '* * * * *'\n    command: [x]\n",
        "jobs.a: needs exactly one schedule (cron, every, at), got cron and every",
        id="two-schedules",
    ),
    pytest.param(
        "jobs:\n  a:\n    cron: '* * * * *'\n    timezone: US/Pacifc\n    command: [x]\n",
        "unknown timezone 'US/Pacifc' (did you mean US/Pacific?)",
        id="unknown-timezone-with-suggestion",
    ),
    pytest.param(
        "defaults:\n  timezone: Mars/Olympus\njobs:\n  a:\n    every: 5s\n    command: [x]\n",
        "unknown timezone 'Mars/Olympus': use an IANA name",
        id="unknown-timezone-in-defaults",
    ),
    pytest.param(
        "jobs:\n  a:\n    at: 2026-12-01T01:30:00\n    command: [x]\n",
        "jobs.a.at: at needs a timezone",
        id="at-without-timezone",
    ),
    pytest.param(
        "jobs:\n  a:\n    cron: '* * * * *'\n    anchor: 2026-01-01T00:00:00Z\n    command: [x]\n",
        "jobs.a.anchor: only an 'every' schedule has an anchor",
        id="anchor-without-every",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    command: [x]\n    jitter: 30s\n",
        "jobs.a.jitter: must be shorter than lock_ttl",
        id="jitter-not-below-lock-ttl",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    command: [x]\n    mode: exclusive\n",
        ":5: jobs.a.mode: Input should be 'efficiency', 'singleton' or 'ownership'",
        id="unknown-mode",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    command: []\n",
        ":4: jobs.a.command: List should have at least 1 item",
        id="empty-command",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    call: no_such_module_for_cli_tests:run\n",
        "call 'no_such_module_for_cli_tests:run': cannot import no_such_module_for_cli_tests",
        id="call-that-does-not-import",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    call: os:no_such_function\n",
        "call 'os:no_such_function': os has no attribute 'no_such_function'",
        id="call-attribute-missing",
    ),
    pytest.param(
        "jobs:\n  a:\n    every: 5s\n    call: os.getcwd\n",
        "call 'os.getcwd': expected package.module:function",
        id="call-without-colon",
    ),
    pytest.param(
        "jobs_modules: [no_such_jobs_module_for_cli_tests]\njobs: {}\n",
        "jobs_modules: cannot import 'no_such_jobs_module_for_cli_tests'",
        id="jobs-module-that-does-not-import",
    ),
    pytest.param(
        "jobs:\n  a/b:\n    every: 5s\n    command: [x]\n",
        "name 'a/b': allowed characters are A-Z a-z 0-9 . _ -",
        id="job-name-with-slash",
    ),
    pytest.param(
        "jobs:\n  nightly backup:\n    every: 5s\n    command: [x]\n",
        "name 'nightly backup': allowed characters",
        id="job-name-with-space",
    ),
    pytest.param(
        "jobs:\n  - a\n  - b\n",
        ":1: jobs must be a mapping keyed by job name",
        id="jobs-is-a-list",
    ),
    pytest.param(
        "jobs: backup\n",
        ":1: jobs must be a mapping keyed by job name",
        id="jobs-is-a-string",
    ),
    pytest.param(
        "jobs:\n",
        ":1: jobs must be a mapping keyed by job name",
        id="jobs-is-empty",
    ),
    pytest.param(
        "jobs:\n  a:\n",
        ":2: jobs.a: Input should be a valid dictionary",
        id="job-is-empty",
    ),
    pytest.param(
        "- jobs\n",
        "the top level must be a mapping of keys, not list",
        id="top-level-is-a-list",
    ),
    pytest.param(
        "jobs:\n\ta: {}\n",
        ":2: not valid YAML: found character '\\t'",
        id="tab-indentation",
    ),
    pytest.param(
        "jobs:\n  a: [\n",
        ":3: not valid YAML",
        id="unclosed-bracket",
    ),
    pytest.param(
        "",
        "empty config; it needs at least a 'jobs:' mapping",
        id="empty-file",
    ),
    pytest.param(
        "# jobs come later\n\n",
        "empty config; it needs at least a 'jobs:' mapping",
        id="only-comments",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIGS)
def test_bad_config_is_one_line_on_stderr_and_exit_78(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "singleton.yaml"
    path.write_text(text)
    result = invoke("check", path)
    assert result.exit_code == EXIT_CONFIG, result.output
    line = one_error_line(result.stderr)
    assert line.startswith("singleton: configuration error: ")
    assert expected.replace("<dir>", str(tmp_path)) in line
    assert result.stdout == ""


def test_config_error_lines_name_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "jobs:\n  a:\n    every: 5s\n    command: [x]\n    tll: 3s\n")
    line = one_error_line(invoke("check", path).stderr)
    assert f"{path}:5: unknown key 'jobs.a.tll'" in line


def test_bad_config_is_refused_by_every_command_that_loads_jobs(tmp_path: Path) -> None:
    path = write_config(tmp_path, "jobs:\n  a:\n    cron: '60 * * * *'\n    command: [x]\n")
    result = invoke("jobs", path)
    assert result.exit_code == EXIT_CONFIG
    assert "minute field '60' out of range 0-59" in one_error_line(result.stderr)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    result = invoke("check", tmp_path / "absent.yaml")
    assert result.exit_code == EXIT_CONFIG
    assert f"config not found: {tmp_path / 'absent.yaml'}" in one_error_line(result.stderr)


def test_non_utf8_config_names_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("jobs:\n  caf\xe9:\n    every: 5s\n".encode("latin-1"))
    result = invoke("check", path)
    assert result.exit_code == EXIT_CONFIG
    assert f"{path}: not UTF-8 (byte 11)" in one_error_line(result.stderr)


def test_oversized_config_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("jobs: {}\n" + "#" * (1 << 20))
    result = invoke("check", path)
    assert result.exit_code == EXIT_CONFIG
    assert "a config file is at most 1 MiB" in one_error_line(result.stderr)


def test_unknown_scheme_error_does_not_show_the_password(tmp_path: Path) -> None:
    path = write_config(tmp_path, "backend:\n  url: amqp://app:hunter2@cache:6379/0\njobs: {}\n")
    result = invoke("check", path)
    assert result.exit_code == EXIT_CONFIG
    line = one_error_line(result.stderr)
    assert "hunter2" not in result.output
    assert "'amqp://app:***@cache:6379/0': unknown scheme amqp://" in line


# --------------------------------------------------------------------------- capabilities


class _NoFenceBackend(MemoryBackend):
    capabilities = Capabilities(fencing=False, shared=False, notify=False)


@pytest.fixture
def nofence() -> Iterator[None]:
    """``nofence://``: a backend without fencing, registered in this process only."""
    singleton.backends.register("nofence", _NoFenceBackend)
    yield
    singleton.backends._REGISTERED.pop("nofence", None)


def test_check_refuses_ownership_on_a_backend_without_fencing(
    tmp_path: Path, nofence: None
) -> None:
    path = write_config(tmp_path, """
        backend:
          url: nofence://svc:hunter2@coordinator
        jobs:
          shard:
            every: 5s
            command: ["true"]
            mode: ownership
    """)
    result = invoke("check", path)
    assert result.exit_code == EXIT_CONFIG
    line = one_error_line(result.stderr)
    assert "jobs.shard: mode ownership needs a backend with fencing" in line
    assert "nofence://svc:***@coordinator" in line
    assert "hunter2" not in result.output


def test_check_accepts_efficiency_on_a_backend_without_fencing(
    tmp_path: Path, nofence: None
) -> None:
    path = write_config(tmp_path, """
        backend:
          url: nofence://
        jobs:
          cache:
            every: 5s
            command: ["true"]
            mode: efficiency
    """)
    result = invoke("check", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ok: 1 jobs")


# --------------------------------------------------------------------------- usage errors


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["check", "--bogus", "c.yaml"], "No such option '--bogus'", id="unknown-flag"),
        pytest.param(["check"], "Missing argument 'CONFIG'", id="missing-config"),
        pytest.param(["frobnicate"], "No such command 'frobnicate'", id="unknown-command"),
        pytest.param(["check", "."], "is a directory", id="directory-as-config"),
        pytest.param(
            ["jobs", "c.yaml", "--next", "0"],
            "0 is not in the range 1<=x<=1000",
            id="next-out-of-range",
        ),
        pytest.param(
            ["jobs", "c.yaml", "--from", "yesterday"],
            "'yesterday' is not an ISO-8601 time",
            id="from-not-a-time",
        ),
        pytest.param(
            ["jobs", "c.yaml", "--from", "2026-10-24T20:00:00"],
            "has no timezone",
            id="from-without-timezone",
        ),
        pytest.param(
            ["history", "c.yaml", "--limit", "-1"],
            "-1 is not in the range x>=0",
            id="negative-history-limit",
        ),
    ],
)
def test_usage_error_exits_2_with_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], expected: str
) -> None:
    write_config(tmp_path, "jobs: {}\n", name="c.yaml")
    monkeypatch.chdir(tmp_path)
    result = invoke(*args)
    assert result.exit_code == EXIT_USAGE, result.output
    assert expected in usage_error_line(result.stderr)


def test_no_subcommand_is_a_usage_error() -> None:
    result = invoke()
    assert result.exit_code == EXIT_USAGE
    assert "Traceback" not in result.output
    assert "Usage: " in result.output


# --------------------------------------------------------------------------- jobs, history, check

SCHEDULES = """
    backend:
      url: sqlite:///ledger.db
    jobs:
      tick:
        every: 7s
        command: ["true"]
      nightly:
        cron: "30 2 * * *"
        timezone: Europe/Berlin
        command: ["true"]
        lock_ttl: 2m
"""
FROM = "2026-10-24T20:00:00Z"


def next_multiples(start: datetime, interval: int, count: int) -> list[str]:
    """Oracle for ``every``: walk second by second, keep whole multiples since the epoch."""
    found: list[str] = []
    moment = start
    while len(found) < count:
        moment += timedelta(seconds=1)
        if int(moment.timestamp()) % interval == 0:
            found.append(moment.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return found


def jobs_json(tmp_path: Path, *extra: str) -> list[dict[str, object]]:
    path = write_config(tmp_path, SCHEDULES)
    result = invoke("jobs", path, "--json", "--next", "3", "--from", FROM, *extra)
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert isinstance(listing, list)
    return listing


def test_jobs_json_is_an_array_of_named_jobs_with_their_next_times(tmp_path: Path) -> None:
    listing = jobs_json(tmp_path)
    assert [entry["name"] for entry in listing] == ["tick", "nightly"]
    for entry in listing:
        assert {"name", "schedule", "mode", "target", "lock_ttl", "next"} <= entry.keys()
        next_times = entry["next"]
        assert isinstance(next_times, list)
        assert len(next_times) == 3
        assert all(ISO_Z.fullmatch(t) for t in next_times)


def test_jobs_json_every_fires_at_multiples_of_the_interval_since_the_epoch(
    tmp_path: Path,
) -> None:
    tick = jobs_json(tmp_path)[0]
    start = datetime(2026, 10, 24, 20, 0, 0, tzinfo=UTC)
    assert tick["next"] == next_multiples(start, 7, 3)
    assert tick["next"] == ["2026-10-24T20:00:04Z", "2026-10-24T20:00:11Z", "2026-10-24T20:00:18Z"]
    assert tick["schedule"] == "every 7s"


def test_jobs_json_cron_runs_a_fixed_time_once_on_the_dst_fall_back_day(tmp_path: Path) -> None:
    """Berlin leaves DST on 2026-10-25: 02:30 happens twice and runs once, the first time."""
    nightly = jobs_json(tmp_path)[1]
    assert nightly["next"] == [
        "2026-10-25T00:30:00Z",
        "2026-10-26T01:30:00Z",
        "2026-10-27T01:30:00Z",
    ]
    assert nightly["lock_ttl"] == 120.0
    assert nightly["mode"] == "singleton"


def test_jobs_every_with_an_anchor_counts_from_the_anchor(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        jobs:
          tick:
            every: 10s
            anchor: 2026-01-01T00:00:03Z
            command: ["true"]
    """)
    result = invoke("jobs", path, "--json", "--next", "2", "--from", FROM)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["next"] == ["2026-10-24T20:00:03Z", "2026-10-24T20:00:13Z"]


def test_jobs_table_lists_every_job(tmp_path: Path) -> None:
    path = write_config(tmp_path, SCHEDULES)
    result = invoke("jobs", path, "--from", FROM)
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == ["JOB", "SCHEDULE", "MODE", "NEXT"]
    assert [row.split()[0] for row in rows] == ["tick", "nightly"]


def test_history_json_on_an_empty_ledger_is_an_empty_array(tmp_path: Path) -> None:
    path = write_config(tmp_path, SCHEDULES)
    result = invoke("history", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_history_does_not_need_importable_job_code(tmp_path: Path) -> None:
    """Reading the ledger must work even when a job's code cannot be imported here."""
    path = write_config(tmp_path, """
        backend:
          url: sqlite:///ledger.db
        jobs:
          a:
            every: 5s
            call: no_such_module_for_cli_tests:run
    """)
    result = invoke("history", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


def test_check_on_a_valid_config_exits_0_and_counts_jobs(tmp_path: Path) -> None:
    path = write_config(tmp_path, SCHEDULES)
    result = invoke("check", path)
    assert result.exit_code == 0, result.output
    assert result.stdout == f"ok: 2 jobs, backend sqlite:///{tmp_path / 'ledger.db'}\n"


# --------------------------------------------------------------------------- real processes


def test_process_version_prints_the_version_and_exits_0(tmp_path: Path) -> None:
    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0
    assert re.fullmatch(r"singleton, version \d+\.\d+\.\d+\S*\n", proc.stdout)


def test_process_usage_error_exits_2(tmp_path: Path) -> None:
    proc = run_cli("check", "--bogus", "c.yaml", cwd=tmp_path)
    assert proc.returncode == EXIT_USAGE
    assert "No such option '--bogus'" in usage_error_line(proc.stderr)


def test_process_unknown_key_is_one_line_and_exit_78(tmp_path: Path) -> None:
    text = "jobs:\n  a:\n    every: 5s\n    command: [x]\n    lock_tll: 9m\n"
    path = write_config(tmp_path, text)
    proc = run_cli("check", path, cwd=tmp_path)
    assert proc.returncode == EXIT_CONFIG
    line = one_error_line(proc.stderr)
    assert line == (
        f"singleton: configuration error: {path}:5:"
        " unknown key 'jobs.a.lock_tll' (did you mean 'lock_ttl'?)"
    )
    assert proc.stdout == ""


def test_process_duplicate_yaml_key_names_both_lines(tmp_path: Path) -> None:
    path = write_config(tmp_path, "jobs:\n  a:\n    every: 5s\n    command: [x]\n    every: 6s\n")
    proc = run_cli("check", path, cwd=tmp_path)
    assert proc.returncode == EXIT_CONFIG
    line = one_error_line(proc.stderr)
    assert f"{path}:5: duplicate key 'jobs.a.every' (first at line 3)" in line


def test_process_missing_file_is_named(tmp_path: Path) -> None:
    proc = run_cli("check", "absent.yaml", cwd=tmp_path)
    assert proc.returncode == EXIT_CONFIG
    assert "config not found: absent.yaml" in one_error_line(proc.stderr)


def test_process_non_utf8_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"jobs: {}\n\xff\xfe\n")
    proc = run_cli("check", path, cwd=tmp_path)
    assert proc.returncode == EXIT_CONFIG
    assert f"{path}: not UTF-8 (byte 9)" in one_error_line(proc.stderr)


def test_process_unreadable_config_path_is_one_line(tmp_path: Path) -> None:
    # As root, chmod 000 does not stop a read, so use a path whose parent is a regular file:
    # a real OSError (ENOTDIR) that is not "not found".
    (tmp_path / "plain").write_text("not a folder\n")
    proc = run_cli("check", "plain/singleton.yaml", cwd=tmp_path)
    assert proc.returncode == EXIT_CONFIG
    assert "cannot read config plain/singleton.yaml: Not a directory" in one_error_line(
        proc.stderr
    )


def test_process_bad_cron_is_one_line_and_exit_78(tmp_path: Path) -> None:
    path = write_config(tmp_path, "jobs:\n  backup:\n    cron: '*/0 * * * *'\n    command: [x]\n")
    proc = run_cli("check", path, cwd=tmp_path)
    assert proc.returncode == EXIT_CONFIG
    line = one_error_line(proc.stderr)
    assert "jobs.backup.cron: cron '*/0 * * * *': step must be at least 1" in line


def test_process_check_output_does_not_show_the_url_password(tmp_path: Path) -> None:
    path = write_config(tmp_path, """
        backend:
          url: memory://svc:hunter2@coordinator
        jobs:
          tick:
            every: 5s
            command: ["true"]
    """)
    proc = run_cli("check", path, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "ok: 1 jobs, backend memory://svc:***@coordinator\n"
    assert "hunter2" not in proc.stdout + proc.stderr


def test_process_env_override_reaches_the_loaded_job(tmp_path: Path) -> None:
    path = write_config(tmp_path, SCHEDULES)
    proc = run_cli(
        "jobs", path, "--json", "--next", "1", "--from", FROM,
        cwd=tmp_path,
        env={"SINGLETON_JOBS__TICK__LOCK_TTL": "9m"},
    )
    assert proc.returncode == 0, proc.stderr
    by_name = {entry["name"]: entry for entry in json.loads(proc.stdout)}
    assert by_name["tick"]["lock_ttl"] == 540.0
    assert by_name["nightly"]["lock_ttl"] == 120.0


def test_process_job_contract_env_does_not_break_loading(tmp_path: Path) -> None:
    """A job command that calls ``singleton`` inherits the SINGLETON_* contract variables."""
    path = write_config(tmp_path, SCHEDULES)
    contract = {
        "SINGLETON_JOB": "tick",
        "SINGLETON_RUN_ID": "tick@2026-10-24T20:00:04Z",
        "SINGLETON_ATTEMPT": "1",
        "SINGLETON_FENCING_TOKEN": "12",
        "SINGLETON_SCHEDULED_AT": "2026-10-24T20:00:04Z",
        "SINGLETON_REPLICA_ID": "host-1",
    }
    proc = run_cli("jobs", path, "--json", "--from", FROM, cwd=tmp_path, env=contract)
    assert proc.returncode == 0, proc.stderr
    assert [entry["name"] for entry in json.loads(proc.stdout)] == ["tick", "nightly"]
