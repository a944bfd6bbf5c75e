"""Projections on every SQL backend: exactly-once rows, read-your-writes, failures, blue/green
rebuild; folds on every backend."""

from __future__ import annotations

import asyncio

import pytest

from tidings import (
    Event,
    EventStore,
    Projection,
    ProjectionError,
    ProjectionTx,
    RecordedEvent,
    RetryPolicy,
    Service,
    SubscriptionConfig,
    UnsupportedOperation,
    fold,
    open_store,
    rebuild_projection,
)
from tidings.processing import projection_status

FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.05, retry=RetryPolicy(max_attempts=2, initial_delay=0.001, max_delay=0.01)
)


class Deposited(Event):
    __event_type__ = "tests.projections.Deposited"
    amount: int


class Withdrawn(Event):
    __event_type__ = "tests.projections.Withdrawn"
    amount: int


class Balances(Projection):
    name = "balances"
    tables = {
        "balances": "CREATE TABLE {balances} (account TEXT PRIMARY KEY, amount INTEGER NOT NULL, "
        "events INTEGER NOT NULL); CREATE INDEX {balances}_amount ON {balances} (amount)"
    }

    def __init__(self, fail_on: int | None = None) -> None:
        super().__init__()
        self.fail_on = fail_on

    def deposited(self, event: Deposited, tx: ProjectionTx) -> None:
        if event.amount == self.fail_on:
            raise ValueError(f"refusing {event.amount}")
        self._add(tx, event.amount)

    def withdrawn(self, event: Withdrawn, tx: ProjectionTx) -> None:
        self._add(tx, -event.amount)

    def _add(self, tx: ProjectionTx, delta: int) -> None:
        tx.execute(
            "INSERT INTO {balances} (account, amount, events) VALUES (?, ?, 1) "
            "ON CONFLICT (account) DO UPDATE SET amount = {balances}.amount + excluded.amount, "
            "events = {balances}.events + 1",
            (tx.recorded.stream_id, delta),
        )


async def balances(store: EventStore) -> dict[str, tuple[int, int]]:
    rows = await store.query("SELECT account, amount, events FROM balances ORDER BY account")
    return {r[0]: (r[1], r[2]) for r in rows}


@pytest.mark.needs("sql")
async def test_projection_rows_and_read_your_writes(store: EventStore) -> None:
    service = Service("bank", store, config=FAST)
    service.add_projection(Balances())
    for i in range(250):
        await store.append(f"acc-{i % 5}", [Deposited(amount=2)])
    async with service.running():
        result = await store.append("acc-0", [Withdrawn(amount=7)])
        assert await service.wait_for(result.position, group="balances", timeout=10)
        assert (await balances(store))["acc-0"] == (93, 51)
    assert await balances(store) == {"acc-0": (93, 51), **{f"acc-{i}": (100, 50) for i in range(1, 5)}}
    [status] = await projection_status(store)
    assert (status.name, status.generation, status.checkpoint, status.lag) == ("balances", 1, 251, 0)
    # Restart (and one more event): nothing is applied twice.
    async with service.running():
        result = await store.append("acc-1", [Deposited(amount=1)])
        assert await service.wait_for(result.position, group="balances", timeout=10)
    assert (await balances(store))["acc-0"] == (93, 51)
    assert (await balances(store))["acc-1"] == (101, 51)


@pytest.mark.needs("sql")
async def test_failing_event_is_dead_lettered_and_others_commit(store: EventStore) -> None:
    service = Service("bank", store, config=FAST)
    service.add_projection(Balances(fail_on=13))
    for amount in [1, 13, 2]:
        last = await store.append("acc", [Deposited(amount=amount)])
    async with service.running():
        assert await service.wait_for(last.position, group="balances", timeout=10)
        [stats] = service.statistics()
    assert await balances(store) == {"acc": (3, 2)}
    [dead] = await store.dead_letters()
    assert dead.group == "projection:balances:g1" and "refusing 13" in dead.error
    assert stats.dead_lettered == 1 and stats.retries == 1


@pytest.mark.needs("sqlite")  # reads sqlite_master
async def test_blue_green_rebuild_while_live(store: EventStore) -> None:
    service = Service("bank", store, config=FAST)
    service.add_projection(Balances())
    for i in range(300):
        await store.append(f"acc-{i % 3}", [Deposited(amount=1)])
    async with service.running():
        assert await service.wait_for(300, group="balances", timeout=10)
        # Corrupt the live read model to prove the rebuild recomputes it from the log.
        await store.transaction(lambda tx: tx.execute("UPDATE balances__g1 SET amount = -1"))
        assert (await balances(store))["acc-0"] == (-1, 100)
        writer_done = asyncio.Event()

        async def keep_writing() -> None:
            for _ in range(100):
                await store.append("acc-0", [Deposited(amount=1)])
                await asyncio.sleep(0)  # a yield, so that the rebuild interleaves (not a wait)
            writer_done.set()

        writer = asyncio.create_task(keep_writing())
        served_during_rebuild = await balances(store)
        generation = await rebuild_projection(store, Balances(), config=FAST)
        await writer
        assert generation == 2
        head = await store.head()
        assert await service.wait_for(head, group="balances", timeout=10)
    assert served_during_rebuild["acc-0"][0] == -1  # the old model kept serving
    assert await balances(store) == {"acc-0": (200, 200), "acc-1": (100, 100), "acc-2": (100, 100)}
    tables = {r[0] for r in await store.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "balances__g2" in tables and "balances__g1" not in tables
    [status] = await projection_status(store)
    assert (status.generation, status.building, status.lag) == (2, None, 0)
    assert "projection:balances:g1" not in await store.checkpoints()


@pytest.mark.needs("postgres")  # reads pg_tables
async def test_blue_green_rebuild_on_postgres(store: EventStore) -> None:
    """The rebuild's DDL (new tables, views swapped, old tables dropped) in PostgreSQL transactions."""
    service = Service("bank", store, config=FAST)
    service.add_projection(Balances())
    for i in range(90):
        await store.append(f"acc-{i % 3}", [Deposited(amount=1)])
    async with service.running():
        assert await service.wait_for(90, group="balances", timeout=30)
        await store.transaction(lambda tx: tx.execute("UPDATE balances__g1 SET amount = -1"))
        assert (await balances(store))["acc-0"] == (-1, 30)
        generation = await rebuild_projection(store, Balances(), config=FAST)
        assert generation == 2
        # The live runner learns of the swap when it next writes; give it an event to write. (Wait
        # on the new generation's group by name: Service.wait_for resolves the group once, so it
        # can be left waiting on the dropped generation if it starts before the runner switches.)
        last = await store.append("acc-0", [Deposited(amount=1)])
        assert await store.wait_for(last.position, group="projection:balances:g2", timeout=30)
    assert await balances(store) == {"acc-0": (31, 31), "acc-1": (30, 30), "acc-2": (30, 30)}
    tables = {
        r[0] for r in await store.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    }
    assert "balances__g2" in tables and "balances__g1" not in tables
    [status] = await projection_status(store)
    assert (status.generation, status.building, status.lag) == (2, None, 0)
    assert "projection:balances:g1" not in await store.checkpoints()


async def test_bad_projection_declarations() -> None:
    class NoName(Projection):
        tables = {"t": "CREATE TABLE {t} (x INT)"}

        def on(self, event: Deposited, tx: ProjectionTx) -> None: ...

    with pytest.raises(ProjectionError):
        NoName()

    class BadTable(Projection):
        name = "bad"
        tables = {"t": "CREATE TABLE wrong (x INT)"}

        def on(self, event: Deposited, tx: ProjectionTx) -> None: ...

    with pytest.raises(ProjectionError):
        BadTable()

    class NoHandlers(Projection):
        name = "empty"

    with pytest.raises(ProjectionError):
        NoHandlers()

    async with open_store("memory://") as memory:
        service = Service("x", memory, config=FAST)
        service.add_projection(Balances())
        # memory:// has no SQL database: refused up front, naming the backend and what needs it.
        with pytest.raises(UnsupportedOperation, match=r"projection 'balances'.*MemoryStore.*SQLStore"):
            await rebuild_projection(memory, Balances())
        with pytest.raises(UnsupportedOperation, match="need a SQL database"):
            await service.run()


async def test_fold_on_demand(store: EventStore) -> None:
    for amount in [5, 7, 11]:
        await store.append("acc", [Deposited(amount=amount)])
    await store.append("other", [Deposited(amount=100)])

    def add(total: int, recorded: RecordedEvent) -> int:
        assert isinstance(recorded.event, Deposited)
        return total + recorded.event.amount

    assert await fold(store, add, 0, stream_id="acc") == 23
    assert await fold(store, add, 0) == 123
    assert await fold(store, add, 0, until_position=2) == 12
