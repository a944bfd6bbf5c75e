"""The event store contract, run against PostgreSQL (a fresh schema per test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tidings import EventStore, open_store
from tidings.testing import StoreContract

pytestmark = pytest.mark.postgres


class TestPostgresStore(StoreContract):
    url: str

    @pytest.fixture(autouse=True)
    def _fresh_schema(self, pg_url: str) -> None:
        self.url = pg_url

    async def make_store(self, tmp_path: Path) -> EventStore:
        return await open_store(self.url).open()
