"""Chaos campaign on SQLite (one file, many processes): owner SIGKILL, SIGSTOP, SIGTERM,
replica restarts and a replica's clock 3 s ahead, then the offline checker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.ci import assert_holds, campaign

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_random_faults_apply_every_firing_once_and_no_stale_write_on_sqlite(
    tmp_path: Path,
) -> None:
    assert_holds(campaign("sqlite", tmp_path))
