"""Aggregates and repositories: record/apply, save/load, time travel, snapshots."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from tidings import (
    Aggregate,
    AggregateNotFound,
    ConcurrencyError,
    Event,
    EventStore,
    InvalidArgument,
    Repository,
    SnapshotError,
    open_store,
)


class CartCreated(Event):
    owner: str


class ItemAdded(Event):
    sku: str
    qty: int


class CartCheckedOut(Event):
    pass


class Cart(Aggregate):
    owner: str = ""
    items: dict[str, int] = {}
    checked_out: bool = False

    @classmethod
    def create(cls, id: str, owner: str) -> Cart:
        cart = cls(id)
        cart.record(CartCreated(owner=owner))
        return cart

    def add(self, sku: str, qty: int) -> None:
        if self.checked_out:
            raise ValueError("cart is checked out")
        self.record(ItemAdded(sku=sku, qty=qty))

    def apply(self, event: Event) -> None:
        match event:
            case CartCreated(owner=owner):
                self.owner = owner
            case ItemAdded(sku=sku, qty=qty):
                self.items[sku] = self.items.get(sku, 0) + qty
            case CartCheckedOut():
                self.checked_out = True


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[EventStore]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/agg.db"
    async with open_store(url) as store:
        yield store


def test_record_applies_and_queues() -> None:
    cart = Cart.create("c1", "ann")
    cart.add("apple", 2)
    cart.add("apple", 1)
    assert cart.items == {"apple": 3} and cart.version == 3
    assert len(cart.pending_events) == 3
    assert Cart("c2").items == {}  # defaults are copied, never shared


async def test_save_and_load(store: EventStore) -> None:
    repo = Repository(store, Cart)
    cart = Cart.create("c1", "ann")
    cart.add("pear", 4)
    result = await repo.save(cart)
    assert result is not None and result.version == 2
    assert cart.pending_events == []
    assert await repo.save(cart) is None
    loaded = await repo.get("c1")
    assert (loaded.owner, loaded.items, loaded.version) == ("ann", {"pear": 4}, 2)
    with pytest.raises(AggregateNotFound):
        await repo.get("nope")


async def test_concurrent_modification_is_detected(store: EventStore) -> None:
    repo = Repository(store, Cart)
    await repo.save(Cart.create("c1", "ann"))
    first, second = await repo.get("c1"), await repo.get("c1")
    first.add("a", 1)
    second.add("b", 1)
    await repo.save(first)
    with pytest.raises(ConcurrencyError) as info:
        await repo.save(second)
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert len(second.pending_events) == 1  # kept, so the caller can decide
    assert (await repo.get("c1")).items == {"a": 1}


async def test_time_travel_by_version_and_time(store: EventStore) -> None:
    repo = Repository(store, Cart)
    cart = Cart.create("c1", "ann")
    await repo.save(cart)
    cart.add("a", 1)
    await repo.save(cart)
    # Time passing is the scenario: the clock moves on between the two saves and the middle.
    await asyncio.sleep(0.02)
    middle = datetime.now(UTC)
    await asyncio.sleep(0.02)
    cart.add("b", 2)
    await repo.save(cart)
    assert (await repo.get("c1", at_version=2)).items == {"a": 1}
    assert (await repo.get("c1", at_version=1)).items == {}
    past = await repo.get("c1", at_time=middle)
    assert (past.version, past.items) == (2, {"a": 1})
    with pytest.raises(AggregateNotFound):
        await repo.get("c1", at_time=middle - timedelta(days=1))
    with pytest.raises(AggregateNotFound):
        await repo.get("c1", at_version=9)
    with pytest.raises(InvalidArgument):
        await repo.get("c1", at_version=0)
    with pytest.raises(InvalidArgument):
        await repo.get("c1", at_version=1, at_time=middle)


async def test_snapshots_are_written_and_used(store: EventStore) -> None:
    repo = Repository(store, Cart, snapshot_every=5)
    cart = Cart.create("c1", "ann")
    for i in range(11):
        cart.add(f"sku{i % 3}", 1)
        await repo.save(cart)
    await repo.flush()
    snap = await store.load_snapshot("c1")
    assert snap is not None and snap.version == 10
    # Prove loading starts from the snapshot: tamper with it and see the tampered state.
    tampered = snap.state.replace(b'"ann"', b'"eve"')
    await store.save_snapshot(
        type(snap)(snap.stream_id, snap.version, snap.aggregate_type, snap.schema, tampered)
    )
    loaded = await repo.get("c1")
    assert loaded.owner == "eve" and loaded.version == 12
    assert sum(loaded.items.values()) == 11
    # Time travel below the snapshot replays from the start.
    assert (await repo.get("c1", at_version=4)).owner == "ann"
    # A repository without snapshots ignores them.
    assert (await Repository(store, Cart).get("c1")).owner == "ann"


async def test_stale_snapshot_schema_is_ignored(store: EventStore) -> None:
    repo = Repository(store, Cart, snapshot_every=2)
    cart = Cart.create("c1", "ann")
    cart.add("a", 1)
    await repo.save(cart)
    await repo.flush()
    snap = await store.load_snapshot("c1")
    assert snap is not None
    await store.save_snapshot(type(snap)("c1", 2, "Cart", "old-schema", b'{"owner":"eve"}'))
    assert (await repo.get("c1")).owner == "ann"
    # Same schema fingerprint but state that no longer validates: ignored too.
    await store.save_snapshot(type(snap)("c1", 2, "Cart", snap.schema, b'{"owner": 5}'))
    assert (await repo.get("c1")).owner == "ann"


async def test_unannotated_state_cannot_be_snapshotted(store: EventStore) -> None:
    class Loose(Aggregate):
        def apply(self, event: Event) -> None:
            self.seen = True

    loose = Loose("l1")
    loose.record(CartCheckedOut())
    with pytest.raises(SnapshotError) as info:
        loose.snapshot_state()
    assert "seen" in str(info.value)
    repo = Repository(store, Loose, snapshot_every=1)
    await repo.save(loose)  # the command still succeeds; the snapshot is skipped
    await repo.flush()
    assert await store.load_snapshot("l1") is None


def test_bad_repository_arguments() -> None:
    store = open_store("memory://")
    with pytest.raises(InvalidArgument):
        Repository(store, Cart, snapshot_every=0)
