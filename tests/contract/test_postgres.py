"""The backend contract over ``postgresql://``, against a real PostgreSQL started for the
session: every connection is a separate backend object with its own connections, as
separate replica processes would have."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from singleton.backends.postgres import PostgresBackend
from singleton.testing.contract import BackendContract, BackendFactory, SharedStateContract
from tests.servers.postgres import PostgresServer, shared_server

pytestmark = pytest.mark.server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    with shared_server() as server:
        yield server


@pytest.fixture(scope="module")
def url(postgres: PostgresServer) -> str:
    return postgres.create_database()


class TestPostgresBackend(BackendContract, SharedStateContract):
    @pytest.fixture
    def backend_factory(self, url: str) -> BackendFactory:
        return lambda: PostgresBackend(url)
