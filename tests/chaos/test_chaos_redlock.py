"""Chaos campaign on Redlock over three redis-servers without persistence. Redlock claims no
fencing: the campaign must still run clean of leaks, and what it predicts (a restarted node
forgets its vote; tokens are not ordered) is counted and reported, not failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.ci import assert_holds, campaign

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(300)]


def test_random_faults_on_redlock_are_counted_and_leave_nothing_behind(tmp_path: Path) -> None:
    assert_holds(campaign("redlock", tmp_path))
