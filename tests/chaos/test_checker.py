"""The checker on hand-written histories: each test one behaviour of the verdict.

Job ``j`` fires every second; the window holds the three firings at t = 100, 101, 102
(Unix seconds), and the harness's clocks are paired so that monotonic = wall - 1000.
"""

from __future__ import annotations

from tests.chaos.checker import (
    QUIET,
    Attempt,
    FaultSpan,
    Window,
    Write,
    check,
    expected_runs,
    fire_instants,
    run_id,
)

WINDOW = Window({"j": 1}, start=100.0, end=102.0, wall0=1000.0, mono0=0.0, recovery=5.0)
RUNS = [run_id("j", t) for t in (100, 101, 102)]


def mono(wall: float) -> float:
    return WINDOW.mono(wall)


def write(seq: int, run: str, token: int, applied: bool = True, reason: str | None = None,
          at: float | None = None) -> Write:  # fmt: skip
    instant = 100 + RUNS.index(run) if run in RUNS else 100
    return Write(seq, "j", run, token, "r1", applied, reason, mono(at if at else instant + 0.2))


def clean() -> tuple[list[Write], list[Attempt]]:
    """Each firing applied once, under tokens 1, 2, 3, and succeeded once in the ledger."""
    writes = [write(i + 1, run, i + 1) for i, run in enumerate(RUNS)]
    history = [Attempt(run, "succeeded", i + 1) for i, run in enumerate(RUNS)]
    return writes, history


def test_fire_instants_are_whole_multiples_of_the_period_inside_the_window() -> None:
    assert fire_instants(5, 101.5, 117.0) == [105, 110, 115]


def test_run_ids_name_the_firing_in_utc_to_the_second() -> None:
    assert run_id("j", 0) == "j@1970-01-01T00:00:00Z"


def test_expected_runs_cover_every_job_of_the_window() -> None:
    window = Window({"a": 1, "b": 2}, 100.0, 102.0, 0.0, 0.0, 5.0)
    assert sorted(expected_runs(window)) == sorted(
        [run_id("a", 100), run_id("a", 101), run_id("a", 102), run_id("b", 100), run_id("b", 102)]
    )


def test_a_clean_history_has_no_violation() -> None:
    verdict = check(WINDOW, *clean(), faults=[])
    assert verdict.firings == 3 and verdict.applied == 3
    assert verdict.violations(fencing=True) == []


def test_a_firing_without_an_applied_write_is_a_miss() -> None:
    writes, history = clean()
    verdict = check(WINDOW, writes[:2], history[:2], faults=[])
    assert [run for run, _ in verdict.misses] == [RUNS[2]]


def test_a_miss_with_no_fault_near_is_unexplained_and_fails_a_fencing_backend() -> None:
    writes, history = clean()
    verdict = check(WINDOW, writes[:2], history[:2], faults=[])
    assert [run for run, _ in verdict.unexplained] == [RUNS[2]]
    assert any("unexplained miss" in v for v in verdict.violations(fencing=True))


def test_a_miss_during_a_fault_is_explained_and_names_the_fault() -> None:
    writes, history = clean()
    pause = FaultSpan("pause_owner", start=mono(101.5), end=mono(104.0))
    verdict = check(WINDOW, writes[:2], history[:2], faults=[pause])
    assert verdict.unexplained == []
    [(run, why)] = verdict.misses
    assert run == RUNS[2] and why.startswith("pause_owner")
    assert verdict.per_fault["pause_owner"].misses == 1


def test_a_miss_names_the_ledger_evidence() -> None:
    writes, history = clean()
    history[2] = Attempt(RUNS[2], "skipped", None, reason="misfired")
    verdict = check(WINDOW, writes[:2], history, faults=[])
    assert "ledger skipped:misfired" in verdict.misses[0][1]


def test_a_miss_long_after_a_fault_ended_is_not_excused() -> None:
    writes, history = clean()
    old = FaultSpan("kill_owner", start=mono(80.0), end=mono(90.0))
    verdict = check(WINDOW, writes[:2], history[:2], faults=[old])
    assert [run for run, _ in verdict.unexplained] == [RUNS[2]]


def test_an_overlap_skip_by_the_replica_still_running_the_previous_firing_is_explained() -> None:
    writes, history = clean()
    writes[0] = write(1, RUNS[0], 1, at=100.8)
    history[1] = Attempt(RUNS[1], "skipped", None, replica="r1", reason="overlap")
    verdict = check(WINDOW, [writes[0], writes[2]], history, faults=[])
    assert verdict.unexplained == []
    assert verdict.misses[0][1].startswith("overrun")
    assert verdict.per_fault["overrun"].misses == 1


def test_an_overlap_skip_long_after_the_previous_run_ended_is_unexplained() -> None:
    writes, history = clean()
    history[1] = Attempt(RUNS[1], "skipped", None, replica="r1", reason="overlap")
    verdict = check(WINDOW, [writes[0], writes[2]], history, faults=[])
    assert [run for run, _ in verdict.unexplained] == [RUNS[1]]


def test_an_overlap_skip_by_a_replica_that_did_not_run_the_previous_firing_is_unexplained() -> None:
    writes, history = clean()
    writes[0] = write(1, RUNS[0], 1, at=100.8)
    history[1] = Attempt(RUNS[1], "skipped", None, replica="r4", reason="overlap")
    verdict = check(WINDOW, [writes[0], writes[2]], history, faults=[])
    assert [run for run, _ in verdict.unexplained] == [RUNS[1]]


def test_an_applied_write_with_a_lower_token_than_one_applied_before_is_stale() -> None:
    writes, history = clean()
    writes[2] = write(3, RUNS[2], 1)
    verdict = check(WINDOW, writes, history, faults=[])
    assert [w.seq for w in verdict.stale_applied] == [3]
    assert any("stale write applied" in v for v in verdict.violations(fencing=True))


def test_an_equal_token_applied_again_is_not_stale() -> None:
    writes = [write(1, RUNS[0], 4), write(2, RUNS[1], 4), write(3, RUNS[2], 5)]
    history = [Attempt(run, "succeeded", 4) for run in RUNS]
    assert check(WINDOW, writes, history, faults=[]).stale_applied == []


def test_refused_stale_writes_are_counted_not_failed() -> None:
    writes, history = clean()
    writes.append(write(4, RUNS[0], 1, applied=False, reason="StaleToken"))
    verdict = check(WINDOW, writes, history, faults=[])
    assert verdict.stale_refused == 1
    assert verdict.violations(fencing=True) == []


def test_stale_writes_are_checked_per_job() -> None:
    window = Window({"a": 1, "b": 1}, 100.0, 100.0, 1000.0, 0.0, 5.0)
    writes = [
        Write(1, "a", run_id("a", 100), 9, "r1", True, None, mono(100.2)),
        Write(1, "b", run_id("b", 100), 2, "r2", True, None, mono(100.3)),
    ]
    history = [Attempt(run_id("a", 100), "succeeded", 9), Attempt(run_id("b", 100), "succeeded", 2)]
    assert check(window, writes, history, faults=[]).stale_applied == []


def test_a_firing_written_under_two_tokens_is_a_fenced_duplicate_of_the_fault_near() -> None:
    writes, history = clean()
    writes.append(write(4, RUNS[1], 7, applied=False, reason="AlreadyApplied", at=101.9))
    kill = FaultSpan("kill_owner", start=mono(100.9), end=mono(101.5))
    verdict = check(WINDOW, writes, history, faults=[kill])
    assert verdict.duplicates == [RUNS[1]]
    assert verdict.per_fault["kill_owner"].duplicates == 1
    assert verdict.duplicate_refused == 1


def test_a_stale_write_is_attributed_to_the_fault_active_when_it_was_written() -> None:
    writes, history = clean()
    writes.append(write(4, RUNS[0], 1, applied=False, reason="StaleToken", at=103.0))
    pause = FaultSpan("pause_owner", start=mono(100.1), end=mono(102.9))
    verdict = check(WINDOW, writes, history, faults=[pause])
    assert verdict.per_fault["pause_owner"].stale_refused == 1


def test_firings_with_no_fault_near_are_counted_in_the_quiet_row() -> None:
    verdict = check(WINDOW, *clean(), faults=[])
    assert verdict.per_fault[QUIET].firings == 3


def test_faults_injected_are_counted_per_kind() -> None:
    spans = [FaultSpan("cut", 0.0, 1.0), FaultSpan("cut", 2.0, 3.0), FaultSpan("skew", 4.0, 5.0)]
    verdict = check(WINDOW, *clean(), faults=spans)
    assert verdict.per_fault["cut"].injected == 2 and verdict.per_fault["skew"].injected == 1


def test_two_succeeded_attempts_for_one_firing_disagree_with_the_oracle() -> None:
    writes, history = clean()
    history.append(Attempt(RUNS[0], "succeeded", 9))
    verdict = check(WINDOW, writes, history, faults=[])
    assert verdict.ledger_disagreements == [(RUNS[0], "2 succeeded attempts")]


def test_a_succeeded_firing_the_oracle_never_applied_disagrees() -> None:
    writes, history = clean()
    verdict = check(WINDOW, writes[:2], history, faults=[FaultSpan("cut", 0.0, 1e9)])
    assert (RUNS[2], "succeeded in the ledger, never applied") in verdict.ledger_disagreements


def test_an_applied_firing_missing_from_the_ledger_is_excused_only_near_a_fault() -> None:
    writes, history = clean()
    quiet = check(WINDOW, writes, history[:2], faults=[])
    assert quiet.ledger_disagreements == [(RUNS[2], "applied, not succeeded in the ledger")]
    restart = FaultSpan("restart_coordinator", start=mono(101.8), end=mono(102.5))
    noisy = check(WINDOW, writes, history[:2], faults=[restart])
    assert noisy.ledger_disagreements == [] and len(noisy.explained_disagreements) == 1


def test_a_write_well_before_its_fire_time_is_counted_early() -> None:
    writes, history = clean()
    writes[1] = write(2, RUNS[1], 2, at=98.0)
    assert check(WINDOW, writes, history, faults=[]).per_fault[QUIET].early == 1


def test_a_backend_without_fencing_fails_only_on_leaks() -> None:
    writes, history = clean()
    writes[2] = write(3, RUNS[2], 1)
    verdict = check(WINDOW, writes, history[:1], faults=[])
    assert verdict.violations(fencing=False) == []
    leaky = check(WINDOW, writes, history, faults=[], leaks=["process 42 still runs"])
    assert leaky.violations(fencing=False) == ["leak: process 42 still runs"]
