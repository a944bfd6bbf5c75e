"""Processing under faults and misuse: poison events, stops during retries, store failures, bad config;
on every backend that has what each test needs (see ``tests/integration/conftest.py``)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tests.helpers import wait_until
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


@pytest.mark.needs("sql")  # the projection, and the corruption written with SQL
async def test_an_undecodable_event_is_dead_lettered_not_blocking(store: EventStore) -> None:
    for parcel in ["a", "poison", "b"]:
        await store.append(f"parcel-{parcel}", [Shipped(parcel=parcel)])
    # Stored data that no longer validates.
    await store.transaction(
        lambda tx: tx.execute("UPDATE tidings_events SET data = ? WHERE position = 2", (b'{"parcel": 42}',))
    )
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
    # The fault happened: the handler failed once and its runner is waiting to retry.
    await wait_until(lambda: service.statistics() and service.statistics()[0].retries >= 1, 10, "a retry")
    service.stop()  # during the 30 s backoff
    await asyncio.wait_for(task, 5)
    assert calls == [1]
    assert await store.dead_letters() == []
    assert await store.load_checkpoint("faults.flaky") == 0  # delivered again after a restart


@pytest.mark.needs("sqlite")  # takes SQLite's write lock with the sqlite3 driver
async def test_a_locked_store_is_not_a_handler_failure(store_url: str) -> None:
    calls: list[str] = []
    locker = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
    async with open_store(f"{store_url}?busy_timeout=200") as store:
        service = Service("faults", store, config=FAST)

        @service.handles(Shipped)
        async def emit(event: Shipped, ctx: HandlerContext) -> None:
            calls.append(event.parcel)
            if len(calls) == 1:
                # Another process takes the write lock while the runner (holding its group's
                # lease) handles the event: the commit meets the lock.
                locker.execute("BEGIN EXCLUSIVE")
            ctx.emit("receipts", [Receipted(parcel=event.parcel)])

        await store.append("parcel-1", [Shipped(parcel="1")])
        async with service.running():
            # The runner really met the lock: its commit failed with "database is locked".
            error = await wait_until(
                lambda: service.statistics()[0].last_error, 30, "the runner to meet the lock"
            )
            assert "locked" in error
            assert await store.load_checkpoint("faults.emit") == 0
            locker.execute("COMMIT")
            assert await service.wait_for(1, timeout=10)
        locker.close()
        assert await store.dead_letters() == []
        assert await store.stream_version("receipts") == 1  # emitted once
        # The outage was waited out and the same commit tried again: the handler did not run again.
        assert calls == ["1"]
        assert "locked" in (service.statistics()[0].last_error or "")


async def test_stop_during_start_up_is_honoured(store_url: str) -> None:
    store = open_store(store_url)  # not open yet: run() opens it
    opening, go_on = asyncio.Event(), asyncio.Event()
    open_store_now = store.open

    async def held_open() -> EventStore:
        opening.set()
        await go_on.wait()
        return await open_store_now()

    store.open = held_open  # type: ignore[method-assign]
    service = Service("faults", store, config=FAST)
    started: list[str] = []

    @service.handles(Shipped)
    async def noop(event: Shipped) -> None: ...

    @service.on_start
    async def on_start() -> None:
        started.append("started")

    task = asyncio.create_task(service.run())
    await asyncio.wait_for(opening.wait(), 10)  # run() is opening the store
    service.stop()
    go_on.set()
    await asyncio.wait_for(task, 5)
    assert started == [] and service.statistics() == []  # no runner was started
    assert not store.is_open  # run() opened the store, so it closed it


def test_a_service_runs_in_successive_event_loops(store_url: str) -> None:
    service = Service("faults", store_url, config=FAST)
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


@pytest.mark.needs("shared")  # two services open one URL
async def test_two_services_on_one_url_share_a_group(store_url: str) -> None:
    calls: list[str] = []

    def make() -> Service:
        service = Service("faults", store_url, config=FAST)

        @service.handles(Shipped, group="shared")
        async def handle(event: Shipped) -> None:
            calls.append(event.parcel)
            await asyncio.sleep(0)  # a yield, so that the two runners could interleave (not a wait)

        return service

    first, second = make(), make()
    async with first.running(), second.running(), open_store(store_url) as store:
        for i in range(50):
            last = await store.append(f"p-{i}", [Shipped(parcel=str(i))])
        assert await store.wait_for(last.position, group="shared", timeout=10)
        # Both runners were there: one of them stood by while the other handled the group.
        states = [s.state for s in first.statistics() + second.statistics()]
        assert states.count("standby") == 1, states
    assert sorted(calls, key=int) == [str(i) for i in range(50)]


@pytest.mark.needs("sql")
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


@pytest.mark.needs("sql")
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


async def test_reading_a_closed_store(store_url: str) -> None:
    """A reader that outlives close() stops with StoreClosed at its next page, on every backend
    (found by this test: memory kept yielding, PostgreSQL said StoreUnavailable; fixed in 7dbd087)."""
    store = await open_store(store_url).open()
    await store.append("p", [Shipped(parcel="1")] * 1500)
    reader = store.read_all()
    assert (await anext(reader)).position == 1
    await store.close()
    with pytest.raises(StoreClosed):
        async for _ in reader:
            pass
