"""Fixtures shared by the ``singleton.lock`` and ``singleton.leader`` tests (a pytest plugin:
``pytest_plugins = ["tests.coordination"]``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import singleton.locking
from singleton.backends.sqlite import SqliteBackend


@pytest.fixture(autouse=True)
def fresh_connections() -> Iterator[None]:
    """``singleton.lock`` keeps one backend per URL for the process: none leaks between
    tests (each has its own database file), and each is closed."""
    singleton.locking._close_shared()
    yield
    singleton.locking._close_shared()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def backend(url: str) -> Iterator[SqliteBackend]:
    """A connection of the test's own, separate from the one ``singleton.lock`` shares."""
    opened = SqliteBackend(url)
    yield opened
    opened.close()
