"""The backend contract over ``sqlite://``: every connection is a separate SQLite handle on
one file, as separate replica processes would have."""

from __future__ import annotations

from pathlib import Path

import pytest

from singleton.backends.sqlite import SqliteBackend
from singleton.testing.contract import BackendContract, BackendFactory, SharedStateContract


class TestSqliteBackend(BackendContract, SharedStateContract):
    @pytest.fixture
    def backend_factory(self, tmp_path: Path) -> BackendFactory:
        url = f"sqlite:///{tmp_path / 'state.db'}"
        return lambda: SqliteBackend(url)
