"""The nemesis: a seeded random sequence of real faults, one at a time, each logged with its
real monotonic start and end so the checker can attribute what it finds.

The seed fixes which faults come, in what order, and for how long; which replica is "the
owner" when a fault starts depends on the run, so a replay repeats the fault plan, not every
interleaving.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.chaos.coordinators import Coordinator
from tests.chaos.proxy import Mode, ProxySet
from tests.replicas import Fleet, Replica

#: Fault kinds, as the report names them (TESTING.md's matrix numbers in brackets).
FAULTS = {
    "kill_owner": "SIGKILL of the owner, restarted after a TTL (F1)",
    "pause_owner": "SIGSTOP of the owner for 1-3 x TTL, then SIGCONT (F2)",
    "term_owner": "SIGTERM of the owner, restarted once it exited (F13)",
    "restart_replica": "kill -9 and restart of a random replica",
    "restart_coordinator": "restart of the coordinator: every server process (F3)",
    "restart_member": "kill -9 and restart of one cluster member or Redlock node (F3)",
    "pause_coordinator": "SIGSTOP of the coordinator (one member of a cluster) for 1-3 x TTL (F14)",
    "cut": "the owner's connections reset (RST) for 1-3 x TTL (F4)",
    "blackhole": "the owner's connections black-holed for 1-3 x TTL (F4)",
    "slow": "the owner's connections delayed TTL/4, TTL/2 or 1.5 x TTL per chunk, each way,"
    " for 1-3 x TTL (F5)",
    "skew": "one replica restarted under faketime +3s for 2-4 x TTL (F6)",
    "clock_jump": "a Redis server's (one Redlock node's) clock 1-3 x TTL forward: its keys"
    " expire that much early (F6, T3)",
}
SKEW = "+3s"
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


@dataclass(frozen=True)
class Fault:
    """One injected fault; ``start``/``end`` are real ``time.monotonic()`` seconds."""

    kind: str
    target: str
    start: float
    end: float
    detail: str = ""


def skew_env() -> dict[str, str]:
    return {
        "LD_PRELOAD": FAKETIME_LIB,
        "FAKETIME": SKEW,
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_RESET": "1",
    }


def applicable(coordinator: Coordinator) -> list[str]:
    """The faults this backend can be given: no server faults without a server, no proxy
    faults on a file."""
    kinds = ["kill_owner", "pause_owner", "term_owner", "restart_replica", "skew"]
    if coordinator.restart is not None:
        kinds.append("restart_coordinator")
    if coordinator.restart_member is not None:
        kinds.append("restart_member")
    if coordinator.pause is not None:
        kinds.append("pause_coordinator")
    if coordinator.jump is not None:
        kinds.append("clock_jump")
    if coordinator.nodes:
        kinds += ["cut", "blackhole", "slow"]
    return kinds


class Nemesis:
    """Injects faults from its own thread until stopped; every fault heals before the next."""

    def __init__(
        self,
        seed: int,
        fleet: Fleet,
        coordinator: Coordinator,
        proxies: dict[str, ProxySet],
        start_replica: Callable[[str, bool], Replica],
        ttl: float,
        gap: tuple[float, float],
        log: Path,
        only: tuple[str, ...] = (),
    ) -> None:
        self.rng = random.Random(seed)
        self.fleet = fleet
        self.coordinator = coordinator
        self.proxies = proxies
        self.start_replica = start_replica
        self.ttl = ttl
        self.gap = gap
        self.log = log
        self.kinds = [k for k in applicable(coordinator) if not only or k in only]
        assert self.kinds, f"none of {only} applies to {coordinator.backend}"
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "the nemesis did not stop in 120 s"

    def _run(self) -> None:
        while not self._stop.wait(self.rng.uniform(*self.gap)):
            kind = self.rng.choice(self.kinds)
            began = time.monotonic()
            try:
                target, detail = getattr(self, f"_{kind}")()
            except Exception as exc:  # a fault that could not be injected is reported
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                target, detail = "?", f"failed: {exc}"
            self._record(Fault(kind, target, began, time.monotonic(), detail))

    def _record(self, fault: Fault) -> None:
        self.faults.append(fault)
        with self.log.open("a") as out:
            out.write(json.dumps(asdict(fault)) + "\n")

    def _hold(self, low: float, high: float) -> float:
        """Wait a random multiple of the TTL (cut short when the nemesis stops)."""
        seconds = self.rng.uniform(low, high) * self.ttl
        self._stop.wait(seconds)
        return seconds

    # -- targets -------------------------------------------------------------------

    def _alive(self) -> list[Replica]:
        return [r for r in self.fleet.replicas.values() if r.process.poll() is None]

    def _owner(self) -> Replica:
        """A replica running a job now (waiting up to 3 s for one), else any live one."""
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            owners = [r for r in self._alive() if r.children()]
            if owners:
                return self.rng.choice(sorted(owners, key=lambda r: r.name))
            time.sleep(0.05)
        return self.rng.choice(sorted(self._alive(), key=lambda r: r.name))

    def _restart(self, replica: Replica, skewed: bool = False) -> None:
        """Reap the old process (it is ours) and start the same name again."""
        try:
            replica.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            replica.process.kill()
            replica.process.wait()
        self.start_replica(replica.name, skewed)

    # -- faults --------------------------------------------------------------------

    def _kill_owner(self) -> tuple[str, str]:
        owner = self._owner()
        owner.process.send_signal(signal.SIGKILL)
        owner.process.wait()
        self._stop.wait(self.ttl)
        self._restart(owner)
        return owner.name, "SIGKILL; restarted after one TTL"

    def _pause_owner(self) -> tuple[str, str]:
        owner = self._owner()
        owner.signal_tree(signal.SIGSTOP)
        try:
            held = self._hold(1, 3)
        finally:
            owner.signal_tree(signal.SIGCONT)
        return owner.name, f"SIGSTOP for {held:.1f}s"

    def _term_owner(self) -> tuple[str, str]:
        owner = self._owner()
        owner.process.send_signal(signal.SIGTERM)
        self._restart(owner)
        return owner.name, "SIGTERM; restarted after it exited"

    def _restart_replica(self) -> tuple[str, str]:
        replica = self.rng.choice(sorted(self._alive(), key=lambda r: r.name))
        replica.process.send_signal(signal.SIGKILL)
        self._restart(replica)
        return replica.name, "SIGKILL; restarted at once"

    def _restart_coordinator(self) -> tuple[str, str]:
        assert self.coordinator.restart is not None
        return "coordinator", self.coordinator.restart(self.rng)

    def _restart_member(self) -> tuple[str, str]:
        assert self.coordinator.restart_member is not None
        return "member", self.coordinator.restart_member(self.rng)

    def _pause_coordinator(self) -> tuple[str, str]:
        assert self.coordinator.pause is not None
        resume, what = self.coordinator.pause(self.rng)
        try:
            held = self._hold(1, 3)
        finally:
            resume()
        return "coordinator", f"{what} for {held:.1f}s"

    def _clock_jump(self) -> tuple[str, str]:
        assert self.coordinator.jump is not None
        return "coordinator", self.coordinator.jump(self.rng, self.rng.uniform(1, 3) * self.ttl)

    def _connection(self, mode: Mode, delay: float = 0.0) -> tuple[str, str]:
        owner = self._owner()
        proxies = self.proxies[owner.name]
        proxies.set_mode(mode, delay)
        try:
            held = self._hold(1, 3)
        finally:
            proxies.set_mode("pass")
        slowed = f" by {delay:.2f}s a chunk" if delay else ""
        return owner.name, f"{mode}{slowed} for {held:.1f}s"

    def _cut(self) -> tuple[str, str]:
        return self._connection("reset")

    def _blackhole(self) -> tuple[str, str]:
        return self._connection("blackhole")

    def _slow(self) -> tuple[str, str]:
        return self._connection("slow", self.ttl * self.rng.choice((0.25, 0.5, 1.5)))

    def _skew(self) -> tuple[str, str]:
        replica = self.rng.choice(sorted(self._alive(), key=lambda r: r.name))
        replica.process.send_signal(signal.SIGTERM)
        self._restart(replica, skewed=True)
        try:
            held = self._hold(2, 4)
        finally:
            skewed = self.fleet.replicas[replica.name]
            skewed.process.send_signal(signal.SIGTERM)
            self._restart(skewed)
        return replica.name, f"faketime {SKEW} for {held:.1f}s"

    def heal(self) -> None:
        """Undo anything a fault left behind (the nemesis heals each fault itself; this is
        for a fault cut short by an exception)."""
        for proxies in self.proxies.values():
            proxies.set_mode("pass")
        for replica in self.fleet.replicas.values():
            if replica.process.poll() is None:
                replica.signal_tree(signal.SIGCONT)
        self.coordinator.heal()
