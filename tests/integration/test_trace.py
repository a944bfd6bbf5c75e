"""The causal trace: one business transaction across two services that each own a store, joined
over the bus; a saga's compensations and deadline; dead letters; the index behind it; bad input.
On SQLite and PostgreSQL (two files, or two schemas of one database)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import psycopg
import pytest

from tests import servers
from tests.helpers import wait_until
from tidings import (
    CausalTrace,
    Command,
    Event,
    EventStore,
    HandlerContext,
    InvalidArgument,
    ManualClock,
    RecordedEvent,
    RetryPolicy,
    Saga,
    Service,
    Step,
    SubscriptionConfig,
    TraceNode,
    TraceNotFound,
    build_trace,
    open_store,
)
from tidings.bus import open_bus
from tidings.integration import IntegrationEvent
from tidings.sagas import saga_state

pytestmark = pytest.mark.needs("shared")

FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.02, retry=RetryPolicy(max_attempts=2, initial_delay=0.001, max_delay=0.01)
)


class OrderPlaced(Event):
    __event_type__ = "tests.trace.OrderPlaced"
    total: int


class OrderSubmitted(IntegrationEvent):
    __source__ = "orders"
    __event_type__ = "tests.trace.OrderSubmitted"
    order_id: str


class StockReserved(IntegrationEvent):
    __source__ = "inventory"
    __event_type__ = "tests.trace.StockReserved"
    order_id: str


class OrderAccepted(Event):
    __event_type__ = "tests.trace.OrderAccepted"


def second_url(store_url: str, tmp_path: Path, name: str) -> str:
    """A store beside ``store_url``: another SQLite file, or another schema of the database."""
    if store_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path}/{name}.db"
    schema = parse_qs(urlsplit(store_url).query)["schema"][0]
    return servers.with_options(store_url, schema=f"{schema}_{name}")


@pytest.fixture
async def two_stores(store_url: str, tmp_path: Path) -> AsyncIterator[tuple[EventStore, EventStore]]:
    async with (
        open_store(second_url(store_url, tmp_path, "orders")) as orders,
        open_store(second_url(store_url, tmp_path, "inventory")) as inventory,
    ):
        yield orders, inventory


def shape(trace: CausalTrace) -> list[tuple[int, str, str]]:
    """(depth, service, short event type) of every node, depth-first."""
    return [(depth, node.service, node.event_type.rsplit(".", 1)[-1]) for node, _, depth in trace.walk()]


async def test_a_transaction_across_two_services_on_the_bus(
    two_stores: tuple[EventStore, EventStore],
) -> None:
    orders_store, inventory_store = two_stores
    async with open_bus("memory://") as bus:
        orders = Service("orders", orders_store, bus=bus, config=FAST)
        inventory = Service("inventory", inventory_store, bus=bus, config=FAST)

        @orders.translates(OrderPlaced)
        def submitted(event: OrderPlaced, recorded: RecordedEvent) -> OrderSubmitted:
            return OrderSubmitted(order_id=recorded.stream_id)

        @inventory.handles(OrderSubmitted)
        async def reserve(event: OrderSubmitted, ctx: HandlerContext) -> None:
            if event.order_id == "order-bad":
                raise RuntimeError("no such warehouse")
            ctx.emit(f"stock-{event.order_id}", [StockReserved(order_id=event.order_id)])

        inventory.publishes(StockReserved)

        @orders.handles(StockReserved)
        async def accept(event: StockReserved, ctx: HandlerContext) -> None:
            ctx.emit(event.order_id, [OrderAccepted()])

        async with orders.running(), inventory.running():
            await orders.publish("order-1", [OrderPlaced(total=10)])
            await orders.publish("order-2", [OrderPlaced(total=20)])
            await orders.publish("order-bad", [OrderPlaced(total=30)])

            async def settled() -> bool:
                accepted = [e async for e in orders_store.read_all(event_types=[OrderAccepted])]
                parked = await inventory_store.dead_letters()  # type: ignore[attr-defined]
                return len(accepted) == 2 and len(parked) == 1

            await wait_until(settled, what="two orders accepted and one parked")

    sources = {"orders": orders_store, "inventory": inventory_store}
    trace = await build_trace(sources, "order-1")
    assert shape(trace) == [
        (0, "orders", "OrderPlaced"),
        (1, "inventory", "StockReserved"),
        (2, "orders", "OrderAccepted"),
    ]
    placed, reserved, accepted = list(trace.nodes())
    assert placed.stream_id == "order-1" and placed.version == 1 and placed.source == "orders"
    assert placed.caused_by is None and placed.since_parent_ms is None
    # The consumer's event names the translated (published, never stored) integration event as
    # its cause; the trace hangs it under the domain event it was translated from.
    assert reserved.causation_id != placed.event_id
    assert reserved.caused_by == "handler:inventory.reserve" and reserved.source == "inventory"
    assert accepted.caused_by == "handler:orders.accept" and accepted.stream_id == "order-1"
    assert reserved.since_parent_ms is not None and accepted.since_parent_ms is not None
    assert {n.correlation_id for n in (reserved, accepted)} == {placed.event_id}
    assert trace.correlation_ids == (placed.event_id,)
    assert trace.services == ("orders", "inventory")
    assert not any(n.dead_lettered or n.compensation for n in trace.nodes())

    # By event id (the first, or any later one), by correlation id, by stream: the same tree.
    refs = (placed.event_id, accepted.event_id, reserved.event_id, f"  {reserved.correlation_id} ")
    for ref in refs:
        again = await build_trace(sources, ref)
        assert again.roots == trace.roots and again.correlation_ids == trace.correlation_ids
    # A store given twice (two labels) shows each event once.
    twice = await build_trace({"a": orders_store, "b": orders_store, "inventory": inventory_store}, "order-1")
    assert len(twice) == 3

    # The order that inventory's handler could not take: its dead letter is on the domain event.
    bad = await build_trace(sources, "order-bad")
    [root] = bad.roots
    assert root.event_type == "tests.trace.OrderPlaced" and root.children == ()
    [letter] = root.dead_lettered
    assert letter.group == "inventory.reserve@bus" and letter.service == "inventory"
    assert "no such warehouse" in letter.error and letter.attempts >= 1

    data = orjson.loads(orjson.dumps(trace.to_dict()))
    assert data["count"] == 3 and data["roots"] == [placed.event_id]
    assert [(n["depth"], n["event_type"], n["parent"]) for n in data["nodes"]] == [
        (0, "tests.trace.OrderPlaced", None),
        (1, "tests.trace.StockReserved", placed.event_id),
        (2, "tests.trace.OrderAccepted", reserved.event_id),
    ]
    assert data["nodes"][1]["caused_by"] == "handler:inventory.reserve"
    assert data["nodes"][0]["children"] == [reserved.event_id]


# -- a saga: compensations and a deadline -------------------------------------------------------------


class Submitted(Event):
    __event_type__ = "tests.trace.Submitted"
    order_id: str
    amount: int


class Reserve(Command):
    __event_type__ = "tests.trace.Reserve"
    order_id: str


class Release(Command):
    __event_type__ = "tests.trace.Release"
    order_id: str


class Reserved(Event):
    __event_type__ = "tests.trace.Reserved"


class Released(Event):
    __event_type__ = "tests.trace.Released"


class Charge(Command):
    __event_type__ = "tests.trace.Charge"
    amount: int


class Charged(Event):
    __event_type__ = "tests.trace.Charged"


class Declined(Event):
    __event_type__ = "tests.trace.Declined"


class Checkout(Saga):
    name = "tracedcheckout"
    started_by = Submitted
    steps = (
        Step(
            "reserve",
            to="inventory",
            command=lambda d: Reserve(order_id=d["order_id"]),
            success=Reserved,
            compensation=lambda d: Release(order_id=d["order_id"]),
            compensated_by=Released,
        ),
        Step(
            "charge",
            to="payments",
            command=lambda d: Charge(amount=d["amount"]),
            success=Charged,
            failure=Declined,
            timeout=5,
        ),
    )

    def start(self, event: Event) -> tuple[str, Mapping[str, Any]]:
        assert isinstance(event, Submitted)
        return event.order_id, {"order_id": event.order_id, "amount": event.amount}


def checkout_services(store: EventStore, clock: ManualClock) -> list[Service]:
    orders = Service("orders", store, config=FAST)
    orders.add_saga(Checkout(), clock=clock)
    inventory = Service("inventory", store, config=FAST)
    payments = Service("payments", store, config=FAST)

    @inventory.handles_command(Reserve)
    async def reserve(command: Reserve, ctx: HandlerContext) -> None:
        ctx.emit(f"stock-{command.order_id}", [Reserved()])

    @inventory.handles_command(Release)
    async def release(command: Release, ctx: HandlerContext) -> None:
        ctx.emit(f"stock-{command.order_id}", [Released()])

    @payments.handles_command(Charge)
    async def charge(command: Charge, ctx: HandlerContext) -> None:
        if command.amount == 999:
            return  # never answers: the step's deadline fires
        ctx.emit("payments", [Declined() if command.amount > 100 else Charged()])

    return [orders, inventory, payments]


async def run_checkout(store: EventStore, order_id: str, amount: int) -> None:
    clock = ManualClock()
    services = checkout_services(store, clock)
    running = [service.running() for service in services]
    for cm in running:
        await cm.__aenter__()
    try:
        await store.append(order_id, [Submitted(order_id=order_id, amount=amount)])
        saga_id = f"saga-tracedcheckout-{order_id}"

        async def waiting_for_payment() -> bool:
            return (await saga_state(store, saga_id)).step == "charge"

        async def ended() -> bool:
            return (await saga_state(store, saga_id)).status in ("compensated", "failed", "completed")

        if amount == 999:
            await wait_until(waiting_for_payment, what="the charge step")
            await clock.advance(6)
        await wait_until(ended, what=f"saga {saga_id} to end")
    finally:
        for cm in reversed(running):
            await cm.__aexit__(None, None, None)


def find(trace: CausalTrace, short_type: str) -> list[TraceNode]:
    return [n for n in trace.nodes() if n.event_type.rsplit(".", 1)[-1] == short_type]


async def test_a_declined_payment_shows_the_compensation_flagged(store: EventStore) -> None:
    await run_checkout(store, "o-1", 500)
    trace = await build_trace({"shop": store}, "o-1")
    assert len(trace.roots) == 1 and trace.roots[0].event_type == "tests.trace.Submitted"
    [reserve] = find(trace, "Reserve")
    assert reserve.caused_by == "saga:tracedcheckout.reserve" and not reserve.compensation
    assert reserve.service == "orders" and reserve.saga_id == "saga-tracedcheckout-o-1"
    [reserved] = find(trace, "Reserved")
    assert reserved.service == "inventory" and reserved.caused_by == "handler:inventory.reserve"
    assert reserved.causation_id == reserve.event_id and not reserved.compensation
    # The compensation: the saga's step, the compensating command and its reply, all flagged.
    [release] = find(trace, "Release")
    assert release.compensation and release.caused_by == "saga:tracedcheckout.reserve"
    [released] = find(trace, "Released")
    assert released.compensation and released.causation_id == release.event_id
    assert find(trace, "CompensationStarted")[0].compensation
    assert find(trace, "SagaCompensated")[0].compensation
    assert not any(n.compensation for n in find(trace, "Declined") + find(trace, "StepStarted"))
    # The first event was appended outside any service: it is labelled with its store's name.
    assert trace.services == ("shop", "orders", "inventory", "payments")
    # Every event of the transaction is in the one tree: nothing the saga did is left out.
    in_store = [e async for e in store.read_all() if not e.stream_id.startswith("saga-timeouts")]
    assert len(trace) == len(in_store)


async def test_a_deadline_keeps_what_it_set_off_in_the_trace(store: EventStore) -> None:
    await run_checkout(store, "o-2", 999)
    trace = await build_trace({"shop": store}, "o-2")
    [deadline] = find(trace, "DeadlinePassed")
    assert deadline.caused_by == "saga:tracedcheckout.charge.deadline"
    [failed] = find(trace, "StepFailed")
    assert failed.causation_id == deadline.event_id
    [release] = find(trace, "Release")
    assert release.compensation
    assert len(trace.roots) == 1


# -- the index, the migration, bad input ------------------------------------------------------------


async def test_correlated_reads_use_the_index(store: EventStore, store_url: str) -> None:
    for i in range(300):
        await store.append(f"s-{i}", [OrderAccepted()], metadata={"correlation_id": f"c-{i % 30}"})
    found = [e async for e in store.read_correlated(["c-7"])]
    assert len(found) == 10
    if store_url.startswith("sqlite"):
        path = urlsplit(store_url).path
        with sqlite3.connect(path) as conn:
            plan = conn.execute(
                "EXPLAIN QUERY PLAN SELECT position FROM tidings_events WHERE metadata IS NOT NULL AND "
                "(CASE WHEN json_valid(CAST(metadata AS TEXT)) THEN "
                "CAST(json_extract(CAST(metadata AS TEXT), '$.correlation_id') AS TEXT) END) IN ('c-7')"
            ).fetchall()
        assert any("tidings_events_correlation" in str(row) for row in plan), plan
    else:
        schema = parse_qs(urlsplit(store_url).query)["schema"][0]
        with psycopg.connect(servers.libpq_url(store_url), autocommit=True) as pg:
            pg.execute(f'ANALYZE "{schema}".tidings_events')
            pg.execute("SET enable_seqscan = off")  # a tiny table: ask whether the index *can* serve
            plan = pg.execute(
                f'EXPLAIN SELECT position FROM "{schema}".tidings_events WHERE metadata IS NOT NULL '
                f'AND "{schema}".tidings_correlation_id(metadata) = ANY(%s::text[])',
                (["c-7"],),
            ).fetchall()
        assert any("tidings_events_correlation" in row[0] for row in plan), plan


async def test_unknown_ref_and_bad_input(store: EventStore) -> None:
    await store.append("order-1", [OrderAccepted()])
    sources = {"shop": store}
    for unknown in ("order-404", "00000000-0000-0000-0000-000000000000", "no such correlation"):
        with pytest.raises(TraceNotFound) as info:
            await build_trace(sources, unknown)
        assert info.value.ref == unknown and info.value.sources == ("shop",)
    bad: list[tuple[Any, Any, Any]] = [
        (sources, "", 10),
        (sources, "   ", 10),
        (sources, 42, 10),
        (sources, "a\x00b", 10),
        (sources, "order-1", 0),
        (sources, "order-1", True),
        ({}, "order-1", 10),
        ({"": store}, "order-1", 10),
        ({"x": "sqlite:///x.db"}, "order-1", 10),
        ([store], "order-1", 10),
    ]
    for given, ref, limit in bad:
        with pytest.raises(InvalidArgument):
            await build_trace(given, ref, limit=limit)
    assert len(await build_trace(sources, "order-1")) == 1


async def test_limit_truncates(store: EventStore) -> None:
    await store.append("order-1", [OrderAccepted()] * 5, metadata={"correlation_id": "big"})
    trace = await build_trace({"shop": store}, "big", limit=3)
    assert trace.truncated and len(trace) == 3
    assert not (await build_trace({"shop": store}, "big")).truncated


async def test_an_existing_store_gets_the_index(store_url: str, tmp_path: Path) -> None:
    if store_url.startswith("sqlite"):
        async with open_store(store_url) as store:
            await store.append("s", [OrderAccepted()], metadata={"correlation_id": "c"})
        path = urlsplit(store_url).path
        with sqlite3.connect(path) as conn:
            conn.execute("DROP INDEX tidings_events_correlation")  # as a store made before it
        async with open_store(store_url) as store:
            assert [e.stream_id async for e in store.read_correlated(["c"])] == ["s"]
        with sqlite3.connect(path) as conn:
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")]
        assert "tidings_events_correlation" in names
        return
    from tidings.store.postgres import migrate
    from tidings.store.postgres.schema import _MIGRATIONS_TABLE, MIGRATIONS

    schema = parse_qs(urlsplit(store_url).query)["schema"][0]
    quoted = f'"{schema}"'
    with psycopg.connect(servers.libpq_url(store_url), autocommit=True) as pg:
        # A store at schema version 1, as tidings made it before this index existed.
        pg.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        pg.execute(_MIGRATIONS_TABLE.format(schema=quoted))
        pg.execute(MIGRATIONS[0].sql.format(schema=quoted))
        pg.execute(f"INSERT INTO {quoted}.tidings_migrations (version, description) VALUES (1, 'v1')")
    assert await migrate(store_url) == [2]
    assert await migrate(store_url) == []
    async with open_store(store_url) as store:
        await store.append("s", [OrderAccepted()], metadata={"correlation_id": "c"})
        # A row no reader can parse stays writable (the index reads it as NULL).
        odd = {"text": "nul \x00 inside", "correlation_id": "d"}
        await store.append("t", [OrderAccepted()], metadata=odd)
        assert [e.stream_id async for e in store.read_correlated(["c"])] == ["s"]
    with psycopg.connect(servers.libpq_url(store_url), autocommit=True) as pg:
        pg.execute(f"UPDATE {quoted}.tidings_events SET metadata = %s WHERE stream_id = 's'", (b"{broken",))
        found = pg.execute("SELECT indexname FROM pg_indexes WHERE schemaname = %s", (schema,))
        names = [r[0] for r in found]
    assert "tidings_events_correlation" in names


async def test_a_stream_resolves_to_every_conversation_it_took_part_in(store: EventStore) -> None:
    first = await store.append("acct-1", [OrderAccepted()], metadata={"correlation_id": "c-1"})
    await store.append("other", [OrderAccepted()], metadata={"correlation_id": "c-1", "causation_id": "x"})
    await store.append("acct-1", [OrderAccepted()], metadata={"correlation_id": "c-2"})
    await store.append("acct-1", [OrderAccepted()])  # began a conversation of its own
    own = [e async for e in store.read_stream("acct-1")][-1].event_id
    trace = await build_trace({"bank": store}, "acct-1")
    assert trace.correlation_ids == ("c-1", "c-2", str(own))
    assert len(trace) == 4 and len(trace.roots) == 4  # no causes among them: four roots
    assert [r.position for r in trace.roots] == [first.position, first.position + 1, 3, 4]
    # A trace holds at most `limit` events, and resolves a stream through that many at most.
    assert (await build_trace({"bank": store}, "acct-1", limit=1)).correlation_ids == ("c-1",)


async def test_a_loop_of_causes_is_cut_once_and_a_long_chain_links(store: EventStore) -> None:
    # Hand-written metadata: a -> b -> c -> a. The link of the last-read event of the loop is cut.
    ids = [uuid.uuid4() for _ in range(3)]
    for i, event_id in enumerate(ids):
        metadata = {"correlation_id": "loop", "causation_id": str(ids[i - 1])}
        await store.append("loop", [OrderAccepted()], metadata=metadata, event_ids=[event_id])
    trace = await build_trace({"shop": store}, "loop")
    assert [root.event_id for root in trace.roots] == [str(ids[2])]
    assert [n.event_id for n in trace.nodes()] == [str(ids[2]), str(ids[0]), str(ids[1])]

    # A chain of causes deeper than the recursion limit: one root, every event at its depth.
    chain = [uuid.uuid4() for _ in range(1_500)]
    for i, event_id in enumerate(chain):
        metadata = {"correlation_id": str(chain[0])} | ({"causation_id": str(chain[i - 1])} if i else {})
        await store.append("chain", [OrderAccepted()], metadata=metadata, event_ids=[event_id])
    deep = await build_trace({"shop": store}, str(chain[0]))
    assert len(deep.roots) == 1 and len(deep) == len(chain)
    assert [(node.event_id, depth) for node, _, depth in deep.walk()] == [
        (str(event_id), i) for i, event_id in enumerate(chain)
    ]


async def test_the_correlation_index_can_be_built_beforehand(store_url: str) -> None:
    """On a large store the operator builds the index without blocking appends (PostgreSQL: CREATE
    INDEX CONCURRENTLY, as the README says); opening or migrating the store then keeps it."""
    if store_url.startswith("sqlite"):
        async with open_store(store_url) as store:
            await store.append("s", [OrderAccepted()], metadata={"correlation_id": "c"})
        path = urlsplit(store_url).path
        with sqlite3.connect(path) as conn:
            sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'tidings_events_correlation'")
            [[ddl]] = sql.fetchall()
            conn.execute("DROP INDEX tidings_events_correlation")
            conn.execute(ddl)  # built by hand, as the store would
        async with open_store(store_url) as store:
            assert [e.stream_id async for e in store.read_correlated(["c"])] == ["s"]
        return
    from tidings.store.postgres import migrate
    from tidings.store.postgres.schema import _MIGRATIONS_TABLE, MIGRATIONS

    schema = parse_qs(urlsplit(store_url).query)["schema"][0]
    quoted = f'"{schema}"'
    function, _, _ = MIGRATIONS[1].sql.format(schema=quoted).partition("CREATE INDEX")
    with psycopg.connect(servers.libpq_url(store_url), autocommit=True) as pg:
        # A store at schema version 1 with events, as tidings made it before this index existed.
        pg.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        pg.execute(_MIGRATIONS_TABLE.format(schema=quoted))
        pg.execute(MIGRATIONS[0].sql.format(schema=quoted))
        pg.execute(f"INSERT INTO {quoted}.tidings_migrations (version, description) VALUES (1, 'v1')")
        # What the README tells the operator to run beforehand (outside any transaction).
        pg.execute(function)
        pg.execute(
            f"CREATE INDEX CONCURRENTLY tidings_events_correlation ON {quoted}.tidings_events "
            f"({quoted}.tidings_correlation_id(metadata)) WHERE metadata IS NOT NULL"
        )
    assert await migrate(store_url) == [2]
    async with open_store(store_url) as store:
        await store.append("s", [OrderAccepted()], metadata={"correlation_id": "c"})
        assert [e.stream_id async for e in store.read_correlated(["c"])] == ["s"]
    with psycopg.connect(servers.libpq_url(store_url), autocommit=True) as pg:
        found = pg.execute(
            "SELECT indexname FROM pg_indexes WHERE schemaname = %s "
            "AND indexname LIKE 'tidings_events_corr%%'",
            (schema,),
        )
        assert [r[0] for r in found] == ["tidings_events_correlation"]


async def test_a_later_page_of_a_conversation_starts_where_the_last_ended(tmp_path: Path) -> None:
    """SQLite: the correlation index holds the position (rowid), so each page's query searches from
    the page's start (``rowid>?``) rather than collecting the whole conversation every page."""
    url = f"sqlite:///{tmp_path}/pages.db"
    async with open_store(url) as store:
        for _ in range(3):
            await store.append("s", [OrderAccepted()], metadata={"correlation_id": "c"})
        captured: list[tuple[str, list[Any]]] = []
        read = store._read  # type: ignore[attr-defined]

        async def spy(fn: Any) -> Any:
            class Spying:
                def __init__(self, conn: sqlite3.Connection) -> None:
                    self.conn = conn

                def execute(self, sql: str, params: Any = ()) -> Any:
                    captured.append((sql, list(params)))
                    return self.conn.execute(sql, params)

            return await read(lambda conn: fn(Spying(conn)))

        store._read = spy  # type: ignore[attr-defined]
        pages = [e.position async for e in store.read_correlated(["c"], limit=3)]
        assert pages == [1, 2, 3]
    [(sql, params)] = [c for c in captured if "tidings_events_correlation" in c[0] or "IN (SELECT" in c[0]]
    with sqlite3.connect(urlsplit(url).path) as conn:
        plan = [str(row[3]) for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
    assert any("tidings_events_correlation" in step and "rowid>?" in step for step in plan), plan
