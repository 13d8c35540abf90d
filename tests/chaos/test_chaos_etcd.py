"""Chaos campaign on a three-member etcd cluster: owner faults, restarts of one member and of
the whole cluster, the owner's connections cut or black-holed, a skewed replica."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.ci import assert_holds, campaign

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.timeout(300)]


def test_random_faults_apply_every_firing_once_and_no_stale_write_on_etcd(
    tmp_path: Path,
) -> None:
    assert_holds(campaign("etcd", tmp_path))
