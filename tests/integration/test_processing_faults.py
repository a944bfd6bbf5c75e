"""Processing under faults and misuse: poison events, stops during retries, store failures, bad config."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tidings import (
    Event,
    EventStore,
    HandlerContext,
    InvalidArgument,
    Projection,
    ProjectionError,
    ProjectionTx,
    RetryPolicy,
    Service,
    SQLiteInbox,
    StoreClosed,
    SubscriptionConfig,
    open_store,
    rebuild_projection,
)

FAST = SubscriptionConfig(
    batch_size=20, poll_interval=0.05, retry=RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.01)
)


class Shipped(Event):
    __event_type__ = "tests.faults.Shipped"
    parcel: str


class Receipted(Event):
    __event_type__ = "tests.faults.Receipted"
    parcel: str


class Tally(Projection):
    name = "tally"
    tables = {"tally": "CREATE TABLE {tally} (parcel TEXT PRIMARY KEY)"}

    def shipped(self, event: Shipped, tx: ProjectionTx) -> None:
        tx.execute("INSERT INTO {tally} VALUES (?)", (event.parcel,))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[EventStore]:
    async with open_store(f"sqlite:///{tmp_path}/faults.db?busy_timeout=200") as store:
        yield store


async def test_an_undecodable_event_is_dead_lettered_not_blocking(store: EventStore, tmp_path: Path) -> None:
    for parcel in ["a", "poison", "b"]:
        await store.append(f"parcel-{parcel}", [Shipped(parcel=parcel)])
    with sqlite3.connect(tmp_path / "faults.db") as db:  # stored data that no longer validates
        db.execute("UPDATE tidings_events SET data = '{\"parcel\": 42}' WHERE position = 2")
    handled: list[str] = []
    service = Service("faults", store, config=FAST)
    service.add_projection(Tally())

    @service.handles(Shipped)
    async def ship(event: Shipped) -> None:
        handled.append(event.parcel)

    async with service.running():
        assert await service.wait_for(3, timeout=10)
    assert handled == ["a", "b"]
    assert sorted(r[0] for r in await store.query("SELECT parcel FROM tally")) == ["a", "b"]
    dead = await store.dead_letters()
    assert sorted(d.group for d in dead) == ["faults.ship", "projection:tally:g1"]
    # The dead letter names the unreadable event: its stream, version and position.
    assert all(d.position == 2 and "CorruptEvent" in d.error for d in dead)
    assert all("'parcel-poison', version 1, position 2" in d.error for d in dead)


async def test_stop_while_waiting_to_retry_commits_nothing(store: EventStore) -> None:
    patient = SubscriptionConfig(poll_interval=0.05, retry=RetryPolicy(max_attempts=5, initial_delay=30))
    service = Service("faults", store, config=patient)
    calls: list[int] = []

    @service.handles(Shipped)
    async def flaky(event: Shipped) -> None:
        calls.append(1)
        raise RuntimeError("downstream is down")

    await store.append("parcel-1", [Shipped(parcel="1")])
    task = asyncio.create_task(service.run())
    while not service.statistics() or service.statistics()[0].retries < 1:
        await asyncio.sleep(0.01)
    service.stop()  # during the 30 s backoff
    await asyncio.wait_for(task, 5)
    assert calls == [1]
    assert await store.dead_letters() == []
    assert await store.load_checkpoint("faults.flaky") == 0  # delivered again after a restart


async def test_a_locked_store_is_not_a_handler_failure(store: EventStore, tmp_path: Path) -> None:
    service = Service("faults", store, config=FAST)
    calls: list[str] = []

    locker = sqlite3.connect(tmp_path / "faults.db", isolation_level=None)

    @service.handles(Shipped)
    async def emit(event: Shipped, ctx: HandlerContext) -> None:
        calls.append(event.parcel)
        if len(calls) == 1:
            # Another process takes the write lock while the runner (holding its group's lease)
            # handles the event: the commit meets the lock.
            locker.execute("BEGIN EXCLUSIVE")
        ctx.emit("receipts", [Receipted(parcel=event.parcel)])

    await store.append("parcel-1", [Shipped(parcel="1")])
    async with service.running():
        while not service.statistics()[0].last_error:
            await asyncio.sleep(0.01)
        locker.execute("COMMIT")
        assert await service.wait_for(1, timeout=10)
    locker.close()
    assert await store.dead_letters() == []
    assert await store.stream_version("receipts") == 1  # emitted once
    # The outage was waited out and the same commit tried again: the handler did not run again.
    assert calls == ["1"]
    assert "locked" in (service.statistics()[0].last_error or "")


async def test_stop_during_start_up_is_honoured(tmp_path: Path) -> None:
    service = Service("faults", f"sqlite:///{tmp_path}/s.db", config=FAST)

    @service.handles(Shipped)
    async def noop(event: Shipped) -> None: ...

    task = asyncio.create_task(service.run())
    await asyncio.sleep(0)  # run() is opening the store
    service.stop()
    await asyncio.wait_for(task, 5)


def test_a_service_runs_in_successive_event_loops(tmp_path: Path) -> None:
    service = Service("faults", f"sqlite:///{tmp_path}/loops.db", config=FAST)
    seen: list[str] = []

    @service.handles(Shipped)
    async def collect(event: Shipped) -> None:
        seen.append(event.parcel)

    async def once(parcel: str) -> None:
        async with service.running():
            result = await service.store.append("p", [Shipped(parcel=parcel)])
            assert await service.wait_for(result.position, timeout=10)

    asyncio.run(once("x"))
    asyncio.run(once("y"))
    assert seen == ["x", "y"]


async def test_two_services_on_one_url_share_a_group(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    calls: list[str] = []

    def make() -> Service:
        service = Service("faults", url, config=FAST)

        @service.handles(Shipped, group="shared")
        async def handle(event: Shipped) -> None:
            calls.append(event.parcel)
            await asyncio.sleep(0)

        return service

    first, second = make(), make()
    async with first.running(), second.running(), open_store(url) as store:
        for i in range(50):
            last = await store.append(f"p-{i}", [Shipped(parcel=str(i))])
        assert await store.wait_for(last.position, group="shared", timeout=10)
    assert sorted(calls, key=int) == [str(i) for i in range(50)]


async def test_handler_sql_with_named_parameters(store: EventStore) -> None:
    await store.transaction(lambda tx: tx.execute("CREATE TABLE seen (parcel TEXT, n INTEGER)"))
    service = Service("faults", store, config=FAST)

    @service.handles(Shipped)
    async def remember(event: Shipped, ctx: HandlerContext) -> None:
        ctx.execute("INSERT INTO seen VALUES (:parcel, :n)", {"parcel": event.parcel, "n": 42})
        with pytest.raises(InvalidArgument):
            ctx.execute("INSERT INTO seen VALUES (?, ?)", 42)  # type: ignore[arg-type]

    result = await store.append("p", [Shipped(parcel="z")])
    async with service.running():
        assert await service.wait_for(result.position, timeout=10)
    assert await store.query("SELECT parcel, n FROM seen") == [("z", 42)]


async def test_inbox_scopes_keep_consumers_apart(tmp_path: Path) -> None:
    inbox = SQLiteInbox(f"sqlite:///{tmp_path}/inbox.db")
    try:
        ran: list[str] = []
        assert (await inbox.once("m1", lambda db: ran.append("a"), scope="a"))[0]
        assert (await inbox.once("m1", lambda db: ran.append("b"), scope="b"))[0]
        assert not (await inbox.once("m1", lambda db: ran.append("again"), scope="a"))[0]
        with pytest.raises(ZeroDivisionError):
            await inbox.once("m2", lambda db: 1 / 0, scope="a")
        assert not await inbox.seen("m2", scope="a")  # a failed effect records nothing
        assert await inbox.seen("m1", scope="b")
        assert ran == ["a", "b"]
    finally:
        inbox.close()


async def test_rebuild_refuses_a_rebuild_in_progress(store: EventStore) -> None:
    await store.append("p", [Shipped(parcel="1")])
    assert await rebuild_projection(store, Tally()) == 2
    await store.transaction(lambda tx: tx.execute("UPDATE tidings_projections SET building = 3"))
    with pytest.raises(ProjectionError) as info:
        await rebuild_projection(store, Tally())
    assert "already being rebuilt" in str(info.value)
    # A takeover builds a generation of its own, past the abandoned one (3), so a builder of 3
    # that is still alive cannot write into its tables.
    assert await rebuild_projection(store, Tally(), force=True) == 4
    assert await store.query("SELECT parcel FROM tally") == [("1",)]


def test_bad_configuration_and_declarations() -> None:
    for kwargs in [{"batch_size": 0}, {"batch_size": -5}, {"poll_interval": -1}, {"retry": 3}]:
        with pytest.raises(InvalidArgument):
            SubscriptionConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        RetryPolicy(max_attempts=0)

    class AsyncProjection(Projection):
        name = "bad_async"
        tables = {"t": "CREATE TABLE {t} (x INT)"}

        async def shipped(self, event: Shipped, tx: ProjectionTx) -> None: ...

    with pytest.raises(ProjectionError) as info:
        AsyncProjection()
    assert "async" in str(info.value)


async def test_reading_a_closed_sqlite_store(tmp_path: Path) -> None:
    store = await open_store(f"sqlite:///{tmp_path}/c.db").open()
    await store.append("p", [Shipped(parcel="1")] * 1500)
    reader = store.read_all()
    assert (await anext(reader)).position == 1
    await store.close()
    with pytest.raises(StoreClosed):
        async for _ in reader:
            pass
