"""Handlers that load and save aggregates: no oversell at any batch size, against a concurrent
writer, on every backend; a conflict re-runs only the events it affects."""

from __future__ import annotations

import asyncio
import collections

import pytest

from tidings import (
    Aggregate,
    AggregateNotFound,
    ConcurrencyError,
    Event,
    EventStore,
    HandlerContext,
    InvalidArgument,
    InvalidStreamId,
    Repository,
    RetryPolicy,
    Service,
    SQLStore,
    SubscriptionConfig,
    UnsupportedOperation,
    open_store,
)


class Restocked(Event):
    __event_type__ = "tests.state.Restocked"
    quantity: int


class Reserved(Event):
    __event_type__ = "tests.state.Reserved"
    order_id: str
    quantity: int


class OrderPlaced(Event):
    __event_type__ = "tests.state.OrderPlaced"
    order_id: str
    sku: str
    quantity: int


class OrderAnswered(Event):
    __event_type__ = "tests.state.OrderAnswered"
    order_id: str
    accepted: bool


class StockItem(Aggregate):
    on_hand: int = 0

    def reserve(self, order_id: str, quantity: int) -> bool:
        if quantity > self.on_hand:
            return False
        self.record(Reserved(order_id=order_id, quantity=quantity))
        return True

    def restock(self, quantity: int) -> None:
        self.record(Restocked(quantity=quantity))

    def apply(self, event: Event) -> None:
        match event:
            case Restocked(quantity=q):
                self.on_hand += q
            case Reserved(quantity=q):
                self.on_hand -= q


def config(batch_size: int) -> SubscriptionConfig:
    return SubscriptionConfig(
        batch_size=batch_size,
        poll_interval=0.05,
        retry=RetryPolicy(max_attempts=50, initial_delay=0.001, max_delay=0.01),
    )


def shop(store: EventStore, batch_size: int, calls: collections.Counter[str]) -> Service:
    service = Service("shop", store, config=config(batch_size))

    @service.handles(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: HandlerContext) -> None:
        calls[event.order_id] += 1  # an outside effect: counts every run of the handler
        stock = await ctx.load(StockItem, event.sku)
        accepted = stock.reserve(event.order_id, event.quantity)
        ctx.save(stock)
        ctx.emit(f"answer-{event.order_id}", [OrderAnswered(order_id=event.order_id, accepted=accepted)])

    return service


async def never_negative(store: EventStore, sku: str) -> StockItem:
    """Replay the stock stream and check the invariant at every version, not only at the end."""
    stock = StockItem(sku)
    async for recorded in store.read_stream(sku):
        assert isinstance(recorded.event, Event)
        stock.apply(recorded.event)
        stock.version = recorded.version
        assert stock.on_hand >= 0, f"oversold at version {recorded.version}"
    return stock


async def answers(store: EventStore) -> dict[str, list[bool]]:
    out: dict[str, list[bool]] = collections.defaultdict(list)
    async for recorded in store.read_all(event_types=[OrderAnswered]):
        assert isinstance(recorded.event, OrderAnswered)
        out[recorded.event.order_id].append(recorded.event.accepted)
    return out


@pytest.mark.parametrize("batch_size", [1, 1000])
async def test_the_queued_orders_of_the_issue_never_oversell(store: EventStore, batch_size: int) -> None:
    """Stock of 3, three orders of 2 queued before the service starts: one is accepted."""
    repo = Repository(store, StockItem)
    stock = await repo.get("sku-1", create=True)
    stock.restock(3)
    await repo.save(stock)
    for i in range(3):
        head = (
            await store.append(f"order-{i}", [OrderPlaced(order_id=str(i), sku="sku-1", quantity=2)])
        ).position
    calls: collections.Counter[str] = collections.Counter()
    service = shop(store, batch_size, calls)
    async with service.running():
        assert await service.wait_for(head)
    final = await never_negative(store, "sku-1")
    assert final.on_hand == 1
    assert await answers(store) == {"0": [True], "1": [False], "2": [False]}
    assert calls == {"0": 1, "1": 1, "2": 1}


@pytest.mark.parametrize("batch_size", [1, 1000])
async def test_no_oversell_against_a_concurrent_writer(store: EventStore, batch_size: int) -> None:
    """Orders on two items while another writer reserves from the same items through its own
    repository: the stock never goes below zero and every order is answered exactly once."""
    repo = Repository(store, StockItem)
    for sku in ("sku-a", "sku-b"):
        stock = await repo.get(sku, create=True)
        stock.restock(150)
        await repo.save(stock)
    orders = 200
    head = 0
    for i in range(orders):
        event = OrderPlaced(order_id=str(i), sku="sku-a" if i % 2 else "sku-b", quantity=1 + i % 3)
        head = (await store.append(f"order-{i}", [event])).position
    calls: collections.Counter[str] = collections.Counter()
    service = shop(store, batch_size, calls)
    outside_conflicts = 0
    outside_taken = 0

    async def concurrent_writer() -> None:
        nonlocal outside_conflicts, outside_taken
        for i in range(60):
            sku = "sku-a" if i % 2 else "sku-b"
            while True:
                stock = await repo.get(sku)
                if not stock.reserve(f"outside-{i}", 1):
                    break
                try:
                    await repo.save(stock)
                    outside_taken += 1
                    break
                except ConcurrencyError:
                    outside_conflicts += 1
            await asyncio.sleep(0)  # let the service's runner interleave with this writer

    async with service.running():
        await concurrent_writer()
        assert await service.wait_for(head, timeout=60)
    got = await answers(store)
    assert sorted(got, key=int) == [str(i) for i in range(orders)]
    assert all(len(v) == 1 for v in got.values()), "an order was answered twice"
    accepted_quantity = sum(1 + int(i) % 3 for i, v in got.items() if v[0])
    finals = [await never_negative(store, sku) for sku in ("sku-a", "sku-b")]
    assert sum(f.on_hand for f in finals) == 300 - accepted_quantity - outside_taken
    # Every handler ran at least once; a re-run happens only after a conflict.
    assert set(calls) == {str(i) for i in range(orders)}


async def test_a_conflict_reruns_only_the_events_it_affects(store: EventStore) -> None:
    """Another writer changes sku-b while a batch is in flight: the sku-a orders of that batch
    are not handled again; only the sku-b ones are, on fresh state."""
    repo = Repository(store, StockItem)
    for sku in ("sku-a", "sku-b"):
        stock = await repo.get(sku, create=True)
        stock.restock(100)
        await repo.save(stock)
    head = 0
    for i in range(10):
        event = OrderPlaced(order_id=str(i), sku="sku-a" if i < 5 else "sku-b", quantity=1)
        head = (await store.append(f"order-{i}", [event])).position
    calls: collections.Counter[str] = collections.Counter()
    service = Service("shop", store, config=config(1000))
    interfered = False

    @service.handles(OrderPlaced)
    async def reserve(event: OrderPlaced, ctx: HandlerContext) -> None:
        nonlocal interfered
        calls[event.order_id] += 1
        stock = await ctx.load(StockItem, event.sku)
        if event.order_id == "9" and not interfered:
            # The last handler of the batch: another writer takes stock before the commit.
            interfered = True
            outside = await repo.get("sku-b")
            outside.reserve("outside", 7)
            await repo.save(outside)
        stock.reserve(event.order_id, event.quantity)
        ctx.save(stock)

    async with service.running():
        assert await service.wait_for(head)
    assert interfered
    assert [calls[str(i)] for i in range(5)] == [1] * 5, "unaffected events ran again"
    assert [calls[str(i)] for i in range(5, 10)] == [2] * 5
    assert (await repo.get("sku-a")).on_hand == 95
    assert (await repo.get("sku-b")).on_hand == 100 - 7 - 5


async def test_load_sees_this_batchs_pending_emits_and_get_or_create(store: EventStore) -> None:
    service = Service("shop", store, config=config(1000))
    seen: list[int] = []

    @service.handles(OrderPlaced)
    async def restock_then_read(event: OrderPlaced, ctx: HandlerContext) -> None:
        with pytest.raises(AggregateNotFound):
            await ctx.load(StockItem, "never")
        ctx.emit("sku-z", [Restocked(quantity=event.quantity)])
        stock = await ctx.load(StockItem, "sku-z", create=True)
        seen.append(stock.on_hand)

    head = 0
    for i in range(3):
        head = (
            await store.append(f"o-{i}", [OrderPlaced(order_id=str(i), sku="x", quantity=i + 1)])
        ).position
    async with service.running():
        assert await service.wait_for(head)
    assert seen == [1, 3, 6]


async def test_bad_effects_fail_at_the_handlers_line_and_park_at_once(store: EventStore) -> None:
    """A stream id that can never be stored fails at ctx.emit (not at commit), and the event is
    dead-lettered at its first attempt: retrying cannot help."""
    service = Service("shop", store, config=config(1000))
    errors: list[BaseException] = []
    runs = 0

    @service.handles(OrderPlaced)
    async def bad(event: OrderPlaced, ctx: HandlerContext) -> None:
        nonlocal runs
        runs += 1
        try:
            ctx.emit("", [Restocked(quantity=1)])
        except InvalidStreamId as exc:
            errors.append(exc)
            raise

    head = (await store.append("o-1", [OrderPlaced(order_id="1", sku="x", quantity=1)])).position
    async with service.running():
        assert await service.wait_for(head)
    [dead] = await store.dead_letters()
    assert dead.attempts == 1 and "InvalidStreamId" in dead.error
    assert runs == 1 and len(errors) == 1


async def test_context_argument_errors(store: EventStore) -> None:
    await store.append("o-1", [OrderPlaced(order_id="1", sku="x", quantity=1)])
    [recorded] = [r async for r in store.read_all()]
    ctx = HandlerContext(store, recorded, "g", 1, sql=isinstance(store, SQLStore))
    with pytest.raises(InvalidArgument):
        await ctx.load(dict, "x")  # type: ignore[type-var]
    with pytest.raises(InvalidArgument):
        ctx.save("not an aggregate")  # type: ignore[arg-type]
    with pytest.raises(InvalidStreamId):
        await ctx.load(StockItem, "")
    assert ctx.appends == [] and ctx.statements == []


@pytest.mark.needs("sql")
async def test_context_execute_argument_errors(store: EventStore) -> None:
    await store.append("o-1", [OrderPlaced(order_id="1", sku="x", quantity=1)])
    [recorded] = [r async for r in store.read_all()]
    ctx = HandlerContext(store, recorded, "g", 1, sql=True)
    with pytest.raises(InvalidArgument):
        ctx.execute("")
    with pytest.raises(InvalidArgument):
        ctx.execute("INSERT INTO t VALUES (?)", 5)  # type: ignore[arg-type]
    assert ctx.appends == [] and ctx.statements == []


async def test_context_execute_on_a_store_without_sql() -> None:
    async with open_store("memory://") as store:
        await store.append("o-1", [OrderPlaced(order_id="1", sku="x", quantity=1)])
        [recorded] = [r async for r in store.read_all()]
        ctx = HandlerContext(store, recorded, "g", 1, sql=isinstance(store, SQLStore))
        with pytest.raises(UnsupportedOperation):
            ctx.execute("INSERT INTO t VALUES (1)")
        assert ctx.appends == [] and ctx.statements == []


async def test_emit_and_registration_misuse_fail_with_typed_errors(store: EventStore) -> None:
    await store.append("o-1", [OrderPlaced(order_id="1", sku="x", quantity=1)])
    [recorded] = [r async for r in store.read_all()]
    ctx = HandlerContext(store, recorded, "g", 1)  # type: ignore[arg-type]
    for bad in (None, Restocked(quantity=1), "abc", {"a": 1}, 5):
        with pytest.raises(InvalidArgument):
            ctx.emit("s", bad)  # type: ignore[arg-type]
    assert ctx.appends == []
    service = Service("svc", store)
    with pytest.raises(InvalidArgument, match="Projection"):
        service.add_projection(5)  # type: ignore[arg-type]
    from tidings import EventHandler, Projection

    class P(Projection):
        name = "p"

        def on(self, event: Restocked, tx: object) -> None: ...

    with pytest.raises(InvalidArgument, match="not the class"):
        service.add_projection(P)  # type: ignore[arg-type]

    class H(EventHandler):
        async def on(self, event: Restocked) -> None: ...

    with pytest.raises(InvalidArgument, match="not the class"):
        service.add_handler(H)  # type: ignore[arg-type]


@pytest.mark.needs("sql")
async def test_a_bad_statement_in_a_batch_lands_on_its_own_event(store: EventStore) -> None:
    """The batch commit fails on one handler's SQL: the others are handled again at once and
    commit; only the faulty event is dead-lettered (review finding: all five were parked)."""
    service = Service("shop", store, config=config(1000))

    @service.handles(OrderPlaced)
    async def answer(event: OrderPlaced, ctx: HandlerContext) -> None:
        if event.order_id == "3":
            ctx.execute("INSERT INTO no_such_table VALUES (1)")
        ctx.emit(f"answer-{event.order_id}", [OrderAnswered(order_id=event.order_id, accepted=True)])

    head = 0
    for i in range(5):
        head = (await store.append(f"o-{i}", [OrderPlaced(order_id=str(i), sku="x", quantity=1)])).position
    async with service.running():
        assert await service.wait_for(head)
    [dead] = await store.dead_letters()
    assert dead.stream_id == "o-3" and dead.attempts == 1
    assert sorted(await answers(store)) == ["0", "1", "2", "4"]
