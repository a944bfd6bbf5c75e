"""The store's layers: the append planner, capabilities, the URL-scheme registry, safe URLs."""

from __future__ import annotations

import asyncio
import importlib.metadata
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import tidings.store
from tidings import (
    ConcurrencyError,
    DuplicateEventId,
    EventStore,
    InvalidArgument,
    InvalidStreamId,
    SQLStore,
    TrackingStore,
    UnsupportedOperation,
    open_store,
    register_store,
    require,
)
from tidings.store.append import (
    ANY,
    NO_STREAM,
    AppendRequest,
    AppendResult,
    EncodedEvent,
    StoredId,
    plan_appends,
)
from tidings.store.base import mask_password
from tidings.store.memory import MemoryStore
from tidings.store.postgres import PostgresStore
from tidings.testing import Credited, StoreContract

# -- the append planner ------------------------------------------------------------------------------


def request(stream: str, n: int, expected: object = ANY, ids: list[uuid.UUID] | None = None) -> AppendRequest:
    events = tuple(EncodedEvent(ids[i] if ids else uuid.uuid4(), "t", 1, b"{}") for i in range(n))
    return AppendRequest(stream, events, expected, None, ids is not None)  # type: ignore[arg-type]


def test_planner_decides_each_request_and_isolates_failures() -> None:
    plan = plan_appends(
        [request("a", 2), request("b", 1, expected=5), request("a", 1, expected=2), request("c", 0)],
        {"b": (3, 7), "a": (0, 0)},
        {},
    )
    outcomes = plan.outcomes_at(10)
    assert outcomes[0] == AppendResult(2, 12)
    assert isinstance(outcomes[1], ConcurrencyError) and outcomes[1].actual == 3
    assert outcomes[2] == AppendResult(3, 13)  # sees the first request of the same batch
    assert outcomes[3] == AppendResult(0, 0)
    assert [(e.offset, e.stream_id, e.version) for e in plan.events] == [
        (1, "a", 1),
        (2, "a", 2),
        (3, "a", 3),
    ]


def test_planner_recognises_exact_retries_and_duplicates() -> None:
    ids = [uuid.uuid4(), uuid.uuid4()]
    stored = {ids[0]: StoredId("s", 4, 40), ids[1]: StoredId("s", 5, 41)}
    retry = plan_appends([request("s", 2, expected=3, ids=ids)], {"s": (9, 50)}, stored)
    assert retry.outcomes == [AppendResult(5, 41)] and retry.events == []
    moved = plan_appends([request("other", 2, ids=ids)], {}, stored)
    assert isinstance(moved.outcomes[0], DuplicateEventId)
    # A retry of a request earlier in the same batch gets that request's (pending) result.
    fresh = [uuid.uuid4()]
    twice = plan_appends([request("n", 1, NO_STREAM, fresh), request("n", 1, NO_STREAM, fresh)], {}, {})
    assert twice.outcomes_at(7) == [AppendResult(1, 8), AppendResult(1, 8)]


async def test_one_bad_append_fails_only_itself(tmp_path: Path) -> None:
    """Concurrent appends are batched together; each bad one gets its own error, the rest commit."""
    for url in ("memory://", f"sqlite:///{tmp_path}/b.db"):
        async with open_store(url) as store:
            await store.append("s", [Credited(amount=0)])
            outcomes = await asyncio.gather(
                store.append("a", [Credited(amount=1)]),
                store.append("s", [Credited(amount=2)], expected_version=0),
                store.append("a\ud800", [Credited(amount=3)]),
                store.append("b", [Credited(amount=4)]),
                return_exceptions=True,
            )
            assert isinstance(outcomes[0], AppendResult) and isinstance(outcomes[3], AppendResult)
            assert isinstance(outcomes[1], ConcurrencyError)
            assert isinstance(outcomes[2], InvalidStreamId)
            assert "cannot be encoded as UTF-8" in str(outcomes[2])
            assert [e.stream_id async for e in store.read_all()] == ["s", "a", "b"]


# -- capabilities -------------------------------------------------------------------------------------


async def test_capabilities_are_stated_by_the_classes(tmp_path: Path) -> None:
    memory = open_store("memory://")
    assert isinstance(memory, TrackingStore) and not isinstance(memory, SQLStore)
    assert not hasattr(memory, "transaction") and not hasattr(memory, "query")
    assert require(memory, TrackingStore, "subscriptions") is memory
    with pytest.raises(UnsupportedOperation) as info:
        require(memory, SQLStore, "projections")
    message = str(info.value)
    assert "projections" in message and "MemoryStore" in message and "SQLStore" in message
    assert "sqlite:///" in message  # says what to use instead
    assert info.value.permanent and not info.value.transient
    sqlite = open_store(f"sqlite:///{tmp_path}/c.db")
    assert require(sqlite, SQLStore, "projections") is sqlite


async def test_is_open_and_read_all_stored() -> None:
    store = open_store("memory://")
    assert not store.is_open
    async with store:
        assert store.is_open
        await store.append("s", [Credited(amount=1)], metadata={"user_id": "ann"})
        [stored] = [s async for s in store.read_all_stored()]
        assert (stored.position, stored.stream_id, stored.event_type) == (1, "s", Credited.__event_type__)
        assert stored.data == b'{"amount":1}' and stored.metadata is not None
    assert not store.is_open


# -- the registry of backends ---------------------------------------------------------------------------


class MyMemoryStore(MemoryStore):
    """A third-party backend: memory with another name."""


@pytest.fixture
def mymem() -> Iterator[None]:
    register_store("mymem", MyMemoryStore)
    yield
    tidings.store._registered.pop("mymem", None)


class TestRegisteredBackend(StoreContract):
    """A backend registered in code is opened by URL and certified by the shipped contract."""

    @pytest.fixture(autouse=True)
    def _registered(self, mymem: None) -> None:
        return None

    async def make_store(self, tmp_path: Path) -> EventStore:
        store = open_store("mymem://")
        assert type(store) is MyMemoryStore
        return await store.open()


def test_unknown_scheme_lists_the_known_ones(mymem: None) -> None:
    with pytest.raises(InvalidArgument) as info:
        open_store("mysql://u:secret@h/db")
    message = str(info.value)
    assert "'mysql'" in message and "secret" not in message
    for scheme in ("memory://", "sqlite://", "postgresql://", "postgres://", "mymem://"):
        assert scheme in message
    with pytest.raises(InvalidArgument):
        register_store("Bad Scheme", MyMemoryStore)


def test_built_in_backends_are_entry_points_and_work_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = {ep.name for ep in importlib.metadata.entry_points(group="tidings.stores")}
    assert {"memory", "sqlite", "postgresql", "postgres"} <= names
    monkeypatch.setattr(tidings.store, "_entry_point_cache", {})  # as if no metadata were installed
    assert type(open_store("memory://")) is MemoryStore
    assert type(open_store("postgres://h/db")) is PostgresStore


# -- safe URLs ----------------------------------------------------------------------------------------------


def test_safe_url_masks_every_password() -> None:
    store = PostgresStore("postgresql://ann:s3cret@db.example/app?password=s3cret&sslmode=require")
    assert "s3cret" not in store.safe_url
    assert store.safe_url == "postgresql://ann:***@db.example/app?password=***&sslmode=require"
    assert mask_password("postgresql://h/db?PASSWORD=x&schema=a") == "postgresql://h/db?PASSWORD=***&schema=a"
    assert mask_password("sqlite:///x.db?synchronous=normal") == "sqlite:///x.db?synchronous=normal"
    assert mask_password("memory://") == "memory://"
