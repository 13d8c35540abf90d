"""Loading a config in-process: merging of layers, environment overrides, paths relative to
the config file, capability checks and redaction of passwords.

The one-line error messages seen by a user are the CLI's business (``test_cli.py``); here
the concern is what a loaded :class:`~singleton.app.App` contains.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import singleton.backends
from singleton.app import load
from singleton.backends.base import Capabilities
from singleton.backends.memory import MemoryBackend
from singleton.config import MAX_CONFIG_BYTES, load_settings
from singleton.errors import ConfigError
from singleton.targets import CallTarget, CommandTarget
from singleton.urls import redact

#: The module holding the ``@job`` registry.
JOB_MODULE = importlib.import_module("singleton.jobs")

#: The variables DESIGN's contract sets for a job command; a command that runs ``singleton``
#: itself inherits them.
JOB_CONTRACT_ENV = {
    "SINGLETON_JOB": "heartbeat",
    "SINGLETON_RUN_ID": "heartbeat@2026-12-01T01:30:00Z",
    "SINGLETON_ATTEMPT": "2",
    "SINGLETON_FENCING_TOKEN": "41",
    "SINGLETON_SCHEDULED_AT": "2026-12-01T01:30:00Z",
    "SINGLETON_REPLICA_ID": "host-7",
}


def write_config(folder: Path, text: str, name: str = "singleton.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(autouse=True)
def no_singleton_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from an environment without overrides, even when the suite itself runs as a
    job command of a singleton runner."""
    for key in list(os.environ):
        if key.startswith("SINGLETON_"):
            monkeypatch.delenv(key)


@pytest.fixture(autouse=True)
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Loading puts the config's folder on ``sys.path`` and registers ``@job`` functions in
    a module-global registry: give each test its own, and forget its modules afterwards."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(JOB_MODULE, "_REGISTRY", {})
    modules_before = set(sys.modules)
    yield
    for name in set(sys.modules) - modules_before:
        if name.startswith("cfgjobs_"):
            del sys.modules[name]


@pytest.fixture
def jobs_module(tmp_path: Path) -> Callable[[str], str]:
    """Write a jobs module with a unique name next to the config; returns its name."""

    def make(body: str) -> str:
        name = f"cfgjobs_{uuid.uuid4().hex}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
        importlib.invalidate_caches()
        return name

    return make


DECORATED = """
    from singleton.jobs import job

    @job(name="{name}", every="10s", lock_ttl="20s", misfire_grace="7s", max_attempts=2)
    def work(ctx):
        return None
"""


def unique_job_name() -> str:
    return f"decorated-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- layers


def test_builtin_defaults_fill_every_setting_left_unset(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        jobs:
          tick:
            every: 5s
            command: ["true"]
    """,
    )
    job = load(path).jobs["tick"]
    assert job.mode == "singleton"
    assert job.timezone == "UTC"
    assert job.lock_ttl == 30.0
    assert job.lock_at_least_for == 0.0
    assert job.misfire_grace == 60.0
    assert job.jitter == 0.0
    assert job.max_attempts == 1
    assert job.retry_backoff == 10.0
    assert job.on_orphan == "rerun"
    assert job.overlap == "skip"
    assert job.catchup == "none"
    assert job.catchup_window == job.misfire_grace
    assert job.pause_on_failure is None
    assert job.timeout is None
    assert job.output_limit == 64 * 1024


def test_defaults_section_overrides_builtin_defaults(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        defaults:
          lock_ttl: 45s
          mode: efficiency
          timezone: Europe/Berlin
        jobs:
          tick:
            every: 5s
            command: ["true"]
    """,
    )
    job = load(path).jobs["tick"]
    assert (job.lock_ttl, job.mode, job.timezone) == (45.0, "efficiency", "Europe/Berlin")


def test_job_entry_overrides_defaults_section_key_by_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        defaults:
          lock_ttl: 45s
          misfire_grace: 2m
        jobs:
          tick:
            every: 5s
            command: ["true"]
            lock_ttl: 1m
    """,
    )
    job = load(path).jobs["tick"]
    assert job.lock_ttl == 60.0
    assert job.misfire_grace == 120.0


def test_yaml_job_named_like_a_decorated_one_needs_no_target(
    tmp_path: Path, jobs_module: Callable[[str], str]
) -> None:
    name = unique_job_name()
    module = jobs_module(DECORATED.format(name=name))
    path = write_config(
        tmp_path,
        f"""
        jobs_modules: [{module}]
        jobs:
          {name}:
            lock_ttl: 40s
    """,
    )
    job = load(path).jobs[name]
    assert isinstance(job.target, CallTarget)
    assert job.target.describe().endswith("work")
    assert job.lock_ttl == 40.0


def test_precedence_is_yaml_then_decorator_then_defaults_then_builtin(
    tmp_path: Path, jobs_module: Callable[[str], str]
) -> None:
    name = unique_job_name()
    module = jobs_module(DECORATED.format(name=name))
    path = write_config(
        tmp_path,
        f"""
        jobs_modules: [{module}]
        defaults:
          lock_ttl: 50s
          misfire_grace: 50s
          retry_backoff: 3s
        jobs:
          {name}:
            lock_ttl: 15s
    """,
    )
    job = load(path).jobs[name]
    assert job.lock_ttl == 15.0  # YAML job entry beats the decorator and defaults
    assert job.misfire_grace == 7.0  # decorator beats defaults
    assert job.max_attempts == 2  # decorator beats built-in
    assert job.retry_backoff == 3.0  # defaults beat built-in
    assert job.on_orphan == "rerun"  # built-in, nobody set it


def test_decorated_job_without_yaml_entry_keeps_its_own_settings(
    tmp_path: Path, jobs_module: Callable[[str], str]
) -> None:
    name = unique_job_name()
    module = jobs_module(DECORATED.format(name=name))
    path = write_config(
        tmp_path,
        f"""
        jobs_modules: [{module}]
        jobs: {{}}
    """,
    )
    job = load(path).jobs[name]
    assert (job.lock_ttl, job.misfire_grace, job.max_attempts) == (20.0, 7.0, 2)
    assert job.schedule.describe() == "every 10s"


def test_yaml_schedule_replaces_the_decorator_schedule(
    tmp_path: Path, jobs_module: Callable[[str], str]
) -> None:
    name = unique_job_name()
    module = jobs_module(DECORATED.format(name=name))
    path = write_config(
        tmp_path,
        f"""
        jobs_modules: [{module}]
        jobs:
          {name}:
            cron: "30 2 * * *"
    """,
    )
    assert load(path).jobs[name].schedule.describe() == "cron '30 2 * * *' UTC"


def test_yaml_target_for_a_decorated_job_is_refused(
    tmp_path: Path, jobs_module: Callable[[str], str]
) -> None:
    name = unique_job_name()
    module = jobs_module(DECORATED.format(name=name))
    path = write_config(
        tmp_path,
        f"""
        jobs_modules: [{module}]
        jobs:
          {name}:
            command: ["true"]
    """,
    )
    with pytest.raises(ConfigError, match=re.escape(f"jobs.{name}: is defined by @job")):
        load(path)


def test_jobs_modules_are_found_in_the_config_folder_from_any_working_directory(
    tmp_path: Path, jobs_module: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = unique_job_name()
    module = jobs_module(DECORATED.format(name=name))
    path = write_config(tmp_path, f"jobs_modules: [{module}]\njobs: {{}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert name in load(path).jobs


# --------------------------------------------------------------------------- environment


HEARTBEAT = """
    jobs:
      heartbeat:
        every: 2s
        command: ["true"]
        lock_ttl: 10s
"""


def test_env_override_replaces_a_nested_yaml_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, HEARTBEAT)
    monkeypatch.setenv("SINGLETON_JOBS__HEARTBEAT__LOCK_TTL", "9m")
    assert load(path).jobs["heartbeat"].lock_ttl == 540.0


def test_env_override_keeps_the_other_keys_of_the_same_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, HEARTBEAT)
    monkeypatch.setenv("SINGLETON_JOBS__HEARTBEAT__LOCK_TTL", "9m")
    job = load(path).jobs["heartbeat"]
    assert job.schedule.describe() == "every 2s"
    assert isinstance(job.target, CommandTarget)
    assert job.target.argv == ("true",)


def test_env_override_of_defaults_reaches_every_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, HEARTBEAT)
    monkeypatch.setenv("SINGLETON_DEFAULTS__MODE", "efficiency")
    assert load(path).jobs["heartbeat"].mode == "efficiency"


def test_env_override_of_a_top_level_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, HEARTBEAT)
    monkeypatch.setenv("SINGLETON_KILL_GRACE", "3s")
    assert load(path).settings.kill_grace == 3.0


def test_env_override_of_the_backend_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_config(tmp_path, HEARTBEAT)
    monkeypatch.setenv("SINGLETON_BACKEND__URL", "memory://")
    assert load(path).backend_url == "memory://"


def test_env_override_value_is_checked_like_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, HEARTBEAT)
    monkeypatch.setenv("SINGLETON_JOBS__HEARTBEAT__LOCK_TTL", "500")
    with pytest.raises(ConfigError, match=r"jobs\.heartbeat\.lock_ttl: duration '500' has no unit"):
        load(path)


def test_env_override_with_a_misspelled_key_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, HEARTBEAT)
    monkeypatch.setenv("SINGLETON_JOBS__HEARTBEAT__LOCK_TLL", "9m")
    with pytest.raises(ConfigError, match=r"unknown key 'jobs\.heartbeat\.lock_tll'"):
        load(path)


def test_job_contract_variables_in_the_environment_do_not_break_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job command that runs ``singleton history`` inherits SINGLETON_JOB, _RUN_ID …"""
    path = write_config(tmp_path, HEARTBEAT)
    baseline = load(path)
    for key, value in JOB_CONTRACT_ENV.items():
        monkeypatch.setenv(key, value)
    loaded = load(path)
    # replica_id is left out: SINGLETON_REPLICA_ID doubles as the env override of that key.
    assert loaded.settings.model_dump(exclude={"replica_id"}) == baseline.settings.model_dump(
        exclude={"replica_id"}
    )
    assert loaded.jobs.keys() == baseline.jobs.keys()
    assert loaded.jobs["heartbeat"].lock_ttl == baseline.jobs["heartbeat"].lock_ttl


# --------------------------------------------------------------------------- paths


def test_relative_sqlite_path_resolves_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(
        tmp_path / "conf",
        """
        backend:
          url: sqlite:///state/ledger.db
        jobs: {}
    """,
    )
    monkeypatch.chdir(tmp_path)
    assert load(path).backend_url == f"sqlite:///{tmp_path / 'conf' / 'state' / 'ledger.db'}"


def test_default_backend_is_a_sqlite_file_next_to_the_config(tmp_path: Path) -> None:
    path = write_config(tmp_path / "conf", "jobs: {}\n")
    assert load(path).backend_url == f"sqlite:///{tmp_path / 'conf' / 'singleton.db'}"


def test_absolute_sqlite_path_is_kept(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "conf",
        """
        backend:
          url: sqlite:////var/lib/singleton/ledger.db
        jobs: {}
    """,
    )
    assert load(path).backend_url == "sqlite:////var/lib/singleton/ledger.db"


def test_config_given_by_a_relative_path_still_resolves_to_an_absolute_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path / "conf", "jobs: {}\n")
    monkeypatch.chdir(tmp_path)
    loaded = load(Path("conf/singleton.yaml"))
    assert loaded.base == tmp_path / "conf"
    assert loaded.backend_url == f"sqlite:///{tmp_path / 'conf' / 'singleton.db'}"


def test_relative_command_cwd_resolves_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(
        tmp_path / "conf",
        """
        jobs:
          tick:
            every: 5s
            command: ["true"]
            cwd: work/dir
    """,
    )
    monkeypatch.chdir(tmp_path)
    target = load(path).jobs["tick"].target
    assert isinstance(target, CommandTarget)
    assert target.cwd == tmp_path / "conf" / "work" / "dir"


def test_absolute_command_cwd_is_kept(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "conf",
        """
        jobs:
          tick:
            every: 5s
            command: ["true"]
            cwd: /srv/app
    """,
    )
    target = load(path).jobs["tick"].target
    assert isinstance(target, CommandTarget)
    assert target.cwd == Path("/srv/app")


def test_command_without_cwd_runs_in_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(
        tmp_path / "conf",
        """
        jobs:
          tick:
            every: 5s
            command: ["true"]
    """,
    )
    monkeypatch.chdir(tmp_path)
    target = load(path).jobs["tick"].target
    assert isinstance(target, CommandTarget)
    assert target.cwd == tmp_path / "conf"


# --------------------------------------------------------------------------- reading the file


def test_a_directory_as_config_is_one_read_error(tmp_path: Path) -> None:
    # The suite runs as root, which reads a chmod 000 file anyway; a directory is a path
    # that really fails with an OSError (EISDIR) on read.
    expected = f"cannot read config {tmp_path}: Is a directory"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_settings(tmp_path)


def test_a_config_over_one_mebibyte_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("jobs: {}\n" + "#" * MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match="a config file is at most 1 MiB"):
        load_settings(path)


def test_duplicate_yaml_key_names_both_lines(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        jobs:
          tick:
            every: 5s
            command: ["true"]
            every: 6s
    """,
    )
    # dedent keeps the leading newline: "jobs:" is line 2, the first "every" line 4.
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == (f"{path}:6: duplicate key 'jobs.tick.every' (first at line 4)")


def test_validation_error_names_file_line_and_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        jobs:
          tick:
            every: 5s
            command: ["true"]
            max_attempts: 0
    """,
    )
    where = re.escape(f"{path}:6: jobs.tick.max_attempts: ")
    with pytest.raises(ConfigError, match=f"^{where}"):
        load_settings(path)


# --------------------------------------------------------------------------- backends


class _NoFenceBackend(MemoryBackend):
    capabilities = Capabilities(fencing=False, shared=False, notify=False)

    def __init__(self, url: str = "nofence://") -> None:
        super().__init__(url)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        super().close()


@pytest.fixture
def nofence() -> Iterator[list[_NoFenceBackend]]:
    """The ``nofence://`` scheme: a working backend that cannot fence; yields the opened ones."""
    opened: list[_NoFenceBackend] = []

    def factory(url: str) -> _NoFenceBackend:
        backend = _NoFenceBackend(url)
        opened.append(backend)
        return backend

    singleton.backends.register("nofence", factory)
    yield opened
    singleton.backends._REGISTERED.pop("nofence", None)


def config_with_mode(folder: Path, mode: str, url: str = "nofence://u:hunter2@coordinator") -> Path:
    return write_config(
        folder,
        f"""
        backend:
          url: {url}
        jobs:
          shard:
            every: 5s
            command: ["true"]
            mode: {mode}
    """,
    )


def test_ownership_job_on_a_backend_without_fencing_is_refused(
    tmp_path: Path, nofence: list[_NoFenceBackend]
) -> None:
    app = load(config_with_mode(tmp_path, "ownership"))
    refusal = r"jobs\.shard: mode ownership needs a backend with fencing"
    with pytest.raises(ConfigError, match=refusal):
        app.open_backend()


def test_refusal_for_missing_fencing_closes_the_backend(
    tmp_path: Path, nofence: list[_NoFenceBackend]
) -> None:
    app = load(config_with_mode(tmp_path, "ownership"))
    with pytest.raises(ConfigError):
        app.open_backend()
    assert [backend.closed for backend in nofence] == [True]


def test_refusal_for_missing_fencing_redacts_the_url_password(
    tmp_path: Path, nofence: list[_NoFenceBackend]
) -> None:
    app = load(config_with_mode(tmp_path, "ownership"))
    with pytest.raises(ConfigError) as caught:
        app.open_backend()
    assert "hunter2" not in str(caught.value)
    assert "nofence://u:***@coordinator" in str(caught.value)


@pytest.mark.parametrize("mode", ["efficiency", "singleton"])
def test_other_modes_run_on_a_backend_without_fencing(
    tmp_path: Path, nofence: list[_NoFenceBackend], mode: str
) -> None:
    app = load(config_with_mode(tmp_path, mode))
    app.open_backend().close()


def test_ownership_job_on_a_fencing_backend_opens(tmp_path: Path) -> None:
    app = load(config_with_mode(tmp_path, "ownership", url="memory://"))
    app.open_backend().close()


def test_unknown_scheme_error_redacts_the_password(tmp_path: Path) -> None:
    app = load(config_with_mode(tmp_path, "singleton", url="amqp://u:hunter2@h:6379/0"))
    with pytest.raises(ConfigError) as caught:
        app.open_backend()
    message = str(caught.value)
    assert "hunter2" not in message
    assert "'amqp://u:***@h:6379/0': unknown scheme amqp://" in message
    assert "known: " in message and "memory://" in message and "sqlite://" in message


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            "redis://u:hunter2@h:6379/0", "redis://u:***@h:6379/0", id="user-and-password"
        ),
        pytest.param("redis://:hunter2@h:6379", "redis://:***@h:6379", id="password-only"),
        pytest.param(
            "postgresql://app:s3cr%40t@db.internal:5432/jobs?sslmode=require",
            "postgresql://app:***@db.internal:5432/jobs?sslmode=require",
            id="escaped-at-sign-and-query",
        ),
        pytest.param("REDISS://u:hunter2@h", "REDISS://u:***@h", id="scheme-case-kept"),
        pytest.param(
            "zookeeper://u:hunter2@h1:2181,h2:2181/prefix",
            "zookeeper://u:***@h1:2181,h2:2181/prefix",
            id="several-hosts",
        ),
    ],
)
def test_redact_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redact(url) == shown


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("redis://h:6379/0", id="no-userinfo"),
        pytest.param("redis://user@h:6379", id="user-without-password"),
        pytest.param("sqlite:////var/lib/singleton.db", id="file-path"),
        pytest.param("memory://", id="bare-scheme"),
    ],
)
def test_redact_leaves_urls_without_a_password_unchanged(url: str) -> None:
    assert redact(url) == url


# -- mistakes that once escaped as tracebacks or leaked a password -----------------------------


def test_an_impossible_date_is_a_config_error_with_its_line(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
        jobs:
          once:
            at: 2026-04-31T10:00:00Z
            command: ["true"]
        """,
    )
    with pytest.raises(ConfigError, match=r":3: cannot read a value: .*day is out of range"):
        load_settings(path)


def test_a_yaml_tag_is_a_config_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, "jobs:\n  x:\n    lock_ttl: !env TTL\n")
    with pytest.raises(ConfigError, match="cannot read a value"):
        load_settings(path)


def test_a_list_from_the_environment_must_be_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SINGLETON_JOBS_MODULES", "jobs.nightly")
    path = write_config(tmp_path, "jobs: {}\n")
    with pytest.raises(ConfigError, match=r"environment: .*JSON"):
        load_settings(path)


def test_a_url_given_where_a_mapping_belongs_is_shown_without_its_password(tmp_path: Path) -> None:
    path = write_config(tmp_path, "backend: redis://u:hunter2@h:6379\njobs: {}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert "hunter2" not in str(caught.value)
    assert "redis://u:***@h:6379" in str(caught.value)


def test_a_password_with_an_at_sign_is_redacted_whole() -> None:
    assert redact("redis://u:p@ss@h:6379/0") == "redis://u:***@h:6379/0"


def test_a_yaml_number_is_not_a_duration(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, "jobs:\n  x:\n    every: 2s\n    lock_ttl: 500\n    command: [x]\n"
    )
    with pytest.raises(ConfigError, match=r":4: jobs.x.lock_ttl: duration 500 has no unit"):
        load_settings(path)


def test_an_infinite_duration_is_refused(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, "jobs:\n  x:\n    every: 2s\n    lock_ttl: .inf\n    command: [x]\n"
    )
    with pytest.raises(ConfigError, match="lock_ttl"):
        load_settings(path)


def test_an_error_found_after_validation_names_the_jobs_line(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """\
        jobs:
          fine:
            every: 2s
            command: ["true"]
          wrong:
            cron: "61 * * * *"
            command: ["true"]
        """,
    )
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:5: jobs.wrong.cron: "):
        load(path)


def test_an_unknown_timezone_names_the_job(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, "jobs:\n  x:\n    every: 2s\n    timezone: US/Pacifc\n    command: [x]\n"
    )
    with pytest.raises(ConfigError, match=r"jobs.x.timezone: .*did you mean US/Pacific"):
        load(path)


def test_an_in_memory_sqlite_database_is_refused(tmp_path: Path) -> None:
    path = write_config(tmp_path, "backend:\n  url: 'sqlite:///:memory:'\njobs: {}\n")
    with pytest.raises(ConfigError, match="in-memory database cannot be shared"):
        load(path).open_backend()


def test_the_public_decorator_registers_a_job_from_jobs_modules(
    tmp_path: Path, jobs_module: Callable[[str], str]
) -> None:
    name = unique_job_name()
    module = jobs_module(
        f"""
        import singleton

        @singleton.job(name="{name}", every="5s")
        def work(ctx):
            return None
        """
    )
    path = write_config(tmp_path, f"jobs_modules: [{module}]\njobs: {{}}\n")
    assert load(path).jobs[name].schedule.describe() == "every 5s"


# --------------------------------------------------------------------------- operator controls


def test_a_catchup_window_longer_than_the_ledger_retention_is_refused(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        backend: {url: "memory://", ledger_retention: 1d}
        jobs:
          nightly:
            cron: "0 2 * * *"
            command: ["true"]
            catchup: all
            catchup_window: 2d
    """,
    )
    longer = r":4: jobs\.nightly\.catchup_window: 2d is longer than backend\.ledger_retention"
    with pytest.raises(ConfigError, match=longer):
        load(path)


def test_catchup_all_over_more_firings_than_one_start_runs_is_refused(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
        jobs:
          tick:
            every: 1s
            command: ["true"]
            catchup: all
            catchup_window: 1h
    """,
    )
    with pytest.raises(ConfigError, match=r"holds up to 3600 firings .* at most 1000"):
        load(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [("overlap", "queue"), ("catchup", "some"), ("pause_on_failure", "0"), ("catchup_window", "5")],
)
def test_operator_control_keys_are_checked(tmp_path: Path, key: str, value: str) -> None:
    path = write_config(
        tmp_path,
        f"""
        jobs:
          tick:
            every: 1s
            command: ["true"]
            {key}: {value}
    """,
    )
    with pytest.raises(ConfigError, match=rf":6: jobs\.tick\.{key}: "):
        load(path)
