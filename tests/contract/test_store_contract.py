"""The event store contract, run against every embedded backend."""

from __future__ import annotations

from pathlib import Path

from tidings import EventStore, SQLStore, TrackingStore, open_store, require
from tidings.testing import SQLContract, StoreContract, TrackingContract


class TestMemoryStore(StoreContract):
    async def make_store(self, tmp_path: Path) -> EventStore:
        return await open_store("memory://").open()


class TestSQLiteStore(StoreContract):
    async def make_store(self, tmp_path: Path) -> EventStore:
        return await open_store(f"sqlite:///{tmp_path}/events.db").open()


class TestMemoryTracking(TrackingContract):
    async def make_store(self, tmp_path: Path) -> TrackingStore:
        return require(await open_store("memory://").open(), TrackingStore, "the tracking contract")


class TestSQLiteTracking(TrackingContract):
    async def make_store(self, tmp_path: Path) -> TrackingStore:
        store = await open_store(f"sqlite:///{tmp_path}/events.db").open()
        return require(store, TrackingStore, "the tracking contract")


class TestSQLiteSQL(SQLContract):
    async def make_store(self, tmp_path: Path) -> SQLStore:
        store = await open_store(f"sqlite:///{tmp_path}/events.db").open()
        return require(store, SQLStore, "the SQL contract")
