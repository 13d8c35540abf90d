"""Chaos campaign on Redis with appendonly yes and appendfsync always (the set-up that claims
fencing): owner faults, kill -9 restarts of the server, the owner's connections cut or
black-holed through the harness's proxy, a skewed replica; then the offline checker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.ci import assert_holds, campaign

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(300)]


def test_random_faults_apply_every_firing_once_and_no_stale_write_on_redis(
    tmp_path: Path,
) -> None:
    assert_holds(campaign("redis", tmp_path))
