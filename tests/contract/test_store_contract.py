"""The event store contract, run against every embedded backend."""

from __future__ import annotations

from pathlib import Path

from tidings import EventStore, open_store
from tidings.testing import StoreContract


class TestMemoryStore(StoreContract):
    async def make_store(self, tmp_path: Path) -> EventStore:
        return await open_store("memory://").open()


class TestSQLiteStore(StoreContract):
    async def make_store(self, tmp_path: Path) -> EventStore:
        return await open_store(f"sqlite:///{tmp_path}/events.db").open()
