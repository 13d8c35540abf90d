"""The backend contract over ``memory://``."""

from __future__ import annotations

import pytest

from singleton.backends.memory import MemoryBackend
from singleton.testing.contract import BackendContract, BackendFactory, SharedStateContract


class TestMemoryBackend(BackendContract, SharedStateContract):
    @pytest.fixture
    def backend_factory(self) -> BackendFactory:
        shared = MemoryBackend()
        shared.close = lambda: None  # type: ignore[method-assign]
        return lambda: shared
