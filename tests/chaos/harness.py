"""One chaos campaign: a coordinator, N real ``singleton run`` replicas (each behind its own
proxies), short-interval jobs writing ``run_id token replica`` to the fenced oracle
(:mod:`tests.helpers.sink`, one SQLite file per job), the nemesis, then the checker over the
oracle's log, ``singleton history --json --limit 0`` and the nemesis log.

Every wait is bounded; whatever happens, every process started here is stopped, and the leak
scan runs after the servers are gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.chaos import leaks
from tests.chaos import rundir as runs
from tests.chaos.checker import Verdict, Window, Write
from tests.chaos.coordinators import Coordinator, coordinator
from tests.chaos.nemesis import Fault, Nemesis, skew_env
from tests.chaos.proxy import ProxySet, proxies
from tests.replicas import Fleet, Replica, sink_command, wait_for

WARM_UP = 3.0
#: Seconds of work of the slow jobs (see :class:`Campaign`).
SLOW_JOB = 0.8


@dataclass(frozen=True)
class Spec:
    """A campaign's size: ``duration`` seconds of faults, ``gap`` seconds between them."""

    backend: str
    seed: int
    duration: float
    replicas: int = 3
    jobs: int = 1
    ttl: int = 3
    job_sleep: float = 0.1
    gap: tuple[float, float] = (1.0, 3.0)
    #: Only these fault kinds (default: every one the backend can take).
    faults: tuple[str, ...] = ()

    @property
    def recovery(self) -> float:
        """How long after a fault its effects are excused: a takeover waits out a TTL (a ZK
        session as long), queued firings then run one by one."""
        return 2.0 * self.ttl + 6.0


@dataclass
class Result:
    """What a campaign found, with what the report needs to show it and replay it."""

    spec: Spec
    fencing: bool
    predicted: str | None
    verdict: Verdict
    faults: list[Fault]
    nemesis_errors: list[str]
    crashed: list[str]
    token_regressions: int
    seconds: float
    rundir: Path = field(default_factory=Path)

    def violations(self) -> list[str]:
        """The checker's, plus the harness's own: a fault that could not be injected, or a
        replica that died without being told to, voids the campaign's claim."""
        found = self.verdict.violations(self.fencing)
        found += [f"nemesis: {error}" for error in self.nemesis_errors]
        found += [f"replica exited on its own: {crash}" for crash in self.crashed]
        return found


def read_history(config: Path) -> str:
    """``singleton history CONFIG --json --limit 0``, as an operator would run it: its JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SINGLETON_")}
    done = subprocess.run(
        [sys.executable, "-m", "singleton", "history", str(config), "--json", "--limit", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, f"singleton history failed: {done.stderr[-2000:]}"
    return done.stdout


class Campaign:
    """The moving parts of one run, so each step stays small."""

    def __init__(self, spec: Spec, rundir: Path, coord: Coordinator, stack: ExitStack) -> None:
        self.spec = spec
        self.rundir = rundir
        self.coord = coord
        self.marker = uuid.uuid4().hex
        self.names = [f"r{i}" for i in range(1, spec.replicas + 1)]
        self.proxies: dict[str, ProxySet] = {}
        if coord.nodes:
            for name in self.names:
                self.proxies[name] = stack.enter_context(proxies(coord.nodes))
        self.oracles = {f"job{i}": rundir / f"oracle-job{i}.db" for i in range(1, spec.jobs + 1)}
        # Every second job is slow (every 2 s, 0.8 s of work) and ignores SIGTERM, as a
        # careless job would: a paused owner's job then outlives the runner's SIGTERM long
        # enough to try its stale write, so the oracle's fence is exercised too, not only
        # the runner's self-fencing.
        self.periods = {job: 2 if i % 2 == 0 else 1 for i, job in enumerate(self.oracles, 1)}
        jobs: dict[str, dict[str, object]] = {}
        for job, oracle in self.oracles.items():
            slow = self.periods[job] == 2
            sleep = SLOW_JOB if slow else spec.job_sleep
            jobs[job] = {
                "every": f"{self.periods[job]}s",
                "command": sink_command(oracle, sleep=sleep, ignore_term=slow),
                "lock_ttl": f"{spec.ttl}s",
            }
        settings: dict[str, object] = {
            "backend": {"url": coord.url, **coord.backend_options},
            "kill_grace": "1s",
            "shutdown_grace": "3s",
        }
        self.fleet = Fleet(rundir, coord.url, jobs, settings)

    def start_replica(self, name: str, skewed: bool = False) -> Replica:
        env = {leaks.MARKER: self.marker}
        if name in self.proxies:
            env["SINGLETON_BACKEND__URL"] = self.coord.url_for(self.proxies[name].addresses)
        if skewed:
            env.update(skew_env())
        return self.fleet.start(name, env)

    def writes(self) -> list[Write]:
        return runs.writes(self.rundir)

    def crashed(self) -> list[str]:
        return [
            f"{r.name} exit {r.process.returncode}"
            for r in self.fleet.replicas.values()
            if r.process.poll() is not None
        ]

    def log_events(self) -> list[dict[str, object]]:
        events = []
        for log in sorted(self.rundir.glob("r*.log")):
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"event"' in line:
                    try:
                        events.append(json.loads(line))
                    except ValueError:
                        continue
        return events

    def skip_notes(self) -> dict[str, str]:
        """Run ID -> the skips the replicas logged for it: the product does not record in
        the ledger a firing skipped while the replica stands by for an earlier one."""
        reasons: dict[str, set[str]] = {}
        for event in self.log_events():
            if event.get("event") == "skipped" and isinstance(event.get("run_id"), str):
                reasons.setdefault(str(event["run_id"]), set()).add(str(event.get("reason")))
        return {run: "logs skipped:" + ",".join(sorted(r)) for run, r in reasons.items()}

    def token_regressions(self) -> int:
        return sum(
            log.read_text(errors="replace").count('"event": "token_regression"')
            for log in self.rundir.glob("r*.log")
        )


def run_campaign(spec: Spec, rundir: Path) -> Result:
    began = time.monotonic()
    rundir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        coord = stack.enter_context(coordinator(spec.backend, rundir / "servers"))
        campaign = Campaign(spec, rundir, coord, stack)
        try:
            outcome = _drive(campaign)
        finally:
            campaign.fleet.stop_all()
        (rundir / "history.json").write_text(read_history(campaign.fleet.config))
        server_pids = list(coord.server_pids())
    found = leaks.scan(campaign.marker, server_pids, coord.temp_dirs)
    (rundir / "leaks.json").write_text(json.dumps(found))
    (rundir / "notes.json").write_text(json.dumps(campaign.skip_notes()))
    window, faults, nemesis, crashed = outcome
    runs.save_window(rundir, window)
    verdict = runs.verdict(rundir)
    result = Result(
        spec,
        coord.fencing,
        coord.predicted,
        verdict,
        faults,
        nemesis.errors,
        crashed,
        campaign.token_regressions(),
        time.monotonic() - began,
        rundir,
    )
    (rundir / "verdict.json").write_text(json.dumps(asdict(result), default=str, indent=1))
    return result


def load_result(rundir: Path) -> Result:
    """A finished campaign from its run directory, its verdict recomputed by the checker."""
    saved = json.loads((rundir / "verdict.json").read_text())
    spec = saved["spec"]
    return Result(
        Spec(**{**spec, "gap": tuple(spec["gap"]), "faults": tuple(spec["faults"])}),
        saved["fencing"],
        saved["predicted"],
        runs.verdict(rundir),
        [Fault(**fault) for fault in saved["faults"]],
        saved["nemesis_errors"],
        saved["crashed"],
        saved["token_regressions"],
        saved["seconds"],
        rundir,
    )


def _drive(campaign: Campaign) -> tuple[Window, list[Fault], Nemesis, list[str]]:
    spec = campaign.spec
    wall0, mono0 = time.time(), time.monotonic()
    for name in campaign.names:
        campaign.start_replica(name)
    wait_for("a first applied write", lambda: campaign.writes(), timeout=90, every=0.2)
    # Checked firings start after a warm-up: replicas still importing and connecting are
    # slow enough to overrun the first firings, which says nothing about faults.
    time.sleep(WARM_UP)
    start = float(int(time.time()) + 1)
    nemesis = Nemesis(
        spec.seed,
        campaign.fleet,
        campaign.coord,
        campaign.proxies,
        campaign.start_replica,
        float(spec.ttl),
        spec.gap,
        campaign.rundir / "nemesis.jsonl",
        spec.faults,
    )
    nemesis.start()
    try:
        time.sleep(spec.duration)
    finally:
        nemesis.stop()
        nemesis.heal()
    crashed = campaign.crashed()
    for name in [c.split()[0] for c in crashed]:
        campaign.start_replica(name)
    time.sleep(spec.recovery + 2)
    end = time.time() - 3
    window = Window(campaign.periods, start, end, wall0, mono0, spec.recovery)
    return window, nemesis.faults, nemesis, crashed
