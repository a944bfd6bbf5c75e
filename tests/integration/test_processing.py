"""Subscriptions, handlers, retries, dead letters, inboxes: on every backend."""

from __future__ import annotations

import asyncio

import pytest

from tidings import (
    Event,
    EventHandler,
    EventStore,
    HandlerContext,
    InvalidArgument,
    RetryPolicy,
    Service,
    SubscriptionConfig,
)

FAST = SubscriptionConfig(
    batch_size=50, poll_interval=0.05, retry=RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.01)
)


class OrderPlaced(Event):
    __event_type__ = "tests.processing.OrderPlaced"
    order_id: str
    amount: int


class OrderShipped(Event):
    __event_type__ = "tests.processing.OrderShipped"
    order_id: str


class InvoiceIssued(Event):
    __event_type__ = "tests.processing.InvoiceIssued"
    order_id: str


async def place(store: EventStore, n: int, start: int = 0) -> int:
    result = None
    for i in range(start, start + n):
        result = await store.append(f"order-{i}", [OrderPlaced(order_id=str(i), amount=i)])
    assert result is not None
    return result.position


async def test_catch_up_then_live_fan_out_and_late_group(store: EventStore) -> None:
    service = Service("shop", store, config=FAST)
    seen_a: list[str] = []
    seen_b: list[str] = []

    @service.handles(OrderPlaced)
    async def a(event: OrderPlaced) -> None:
        seen_a.append(event.order_id)

    @service.handles(OrderPlaced, OrderShipped)
    def b(event: Event, ctx: HandlerContext) -> None:  # sync handlers work too
        seen_b.append(f"{ctx.recorded.position}:{type(event).__name__}")

    await place(store, 120)  # history before the service starts: catch-up
    async with service.running():
        head = await place(store, 5, start=120)  # live
        await store.append("order-1", [OrderShipped(order_id="1")])
        assert await service.wait_for(head + 1, timeout=10)
        stats = {s.group: s for s in service.statistics()}
        assert stats["shop.a"].checkpoint == head + 1 and stats["shop.a"].lag == 0
        assert stats["shop.a"].handled == 125 and stats["shop.b"].handled == 126
    assert seen_a == [str(i) for i in range(125)]
    assert len(seen_b) == 126 and seen_b[-1] == "126:OrderShipped"

    # A group added later replays history: add consumers without changing producers.
    late: list[str] = []
    service2 = Service("shop", store, config=FAST)

    @service2.handles(OrderShipped)
    async def c(event: OrderShipped) -> None:
        late.append(event.order_id)

    async with service2.running():
        assert await service2.wait_for(head + 1, timeout=10)
    assert late == ["1"]
    assert (await store.checkpoints())["shop.c"] == head + 1


async def test_class_handler_and_emitted_events_carry_causation(store: EventStore) -> None:
    class Billing(EventHandler):
        group = "billing"

        async def placed(self, event: OrderPlaced, ctx: HandlerContext) -> None:
            ctx.emit(f"invoice-{event.order_id}", [InvoiceIssued(order_id=event.order_id)])

        async def shipped(self, event: OrderShipped, ctx: HandlerContext) -> None:
            ctx.execute("INSERT INTO nothing VALUES (1)")  # never reached: no OrderShipped

    service = Service("billing", store, config=FAST)
    service.add_handler(Billing())
    placed = await store.append(
        "order-7",
        [OrderPlaced(order_id="7", amount=3)],
        metadata={"correlation_id": "corr-1", "user_id": "ann"},
    )
    async with service.running():
        assert await service.wait_for(placed.position, timeout=10)
    [invoice] = [e async for e in store.read_stream("invoice-7")]
    [source] = [e async for e in store.read_stream("order-7")]
    assert invoice.event == InvoiceIssued(order_id="7")
    assert invoice.causation_id == str(source.event_id)
    assert invoice.correlation_id == "corr-1"
    assert invoice.metadata["user_id"] == "ann"
    # Emitted events commit with the checkpoint: replaying from scratch skips via the inbox.
    await store.set_checkpoint("billing", 0)
    async with service.running():
        assert await service.wait_for(invoice.position, timeout=10)
    assert await store.stream_version("invoice-7") == 1


async def test_retries_then_dead_letter_and_move_on(store: EventStore) -> None:
    service = Service("flaky", store, config=FAST)
    attempts: dict[str, int] = {}
    broken = {"poison"}
    healthy: list[str] = []

    @service.handles(OrderPlaced)
    async def flaky(event: OrderPlaced) -> None:
        attempts[event.order_id] = attempts.get(event.order_id, 0) + 1
        if event.order_id in broken:
            raise ValueError("cannot handle poison")
        if event.order_id == "twice" and attempts["twice"] < 3:
            raise RuntimeError("transient")

    @service.handles(OrderPlaced)
    async def other(event: OrderPlaced) -> None:
        healthy.append(event.order_id)

    for oid in ["ok-1", "poison", "twice", "ok-2"]:
        last = await store.append(f"order-{oid}", [OrderPlaced(order_id=oid, amount=1)])
    async with service.running():
        assert await service.wait_for(last.position, timeout=10)
        stats = {s.group: s for s in service.statistics()}
    assert attempts == {"ok-1": 1, "poison": 3, "twice": 3, "ok-2": 1}
    assert healthy == ["ok-1", "poison", "twice", "ok-2"]  # other groups are unaffected
    assert stats["flaky.flaky"].dead_lettered == 1 and stats["flaky.flaky"].retries == 4
    [dead] = await store.dead_letters()
    assert (dead.group, dead.stream_id, dead.attempts, dead.position) == ("flaky.flaky", "order-poison", 3, 2)
    assert "cannot handle poison" in dead.error and "ValueError" in dead.traceback
    assert await store.dead_letter(dead.id) == dead
    assert await store.dead_letters("flaky.other") == []

    # Retrying while the bug is still there: it stays parked, with its id.
    checkpoint = await store.load_checkpoint("flaky.flaky")
    sub = service.subscription("flaky.flaky")
    assert not await sub.retry_dead_letter(dead)
    [still] = await store.dead_letters()
    assert still.id == dead.id and still.attempts == dead.attempts + 1
    # After the fix it is handled once and removed; the checkpoint does not move.
    broken.clear()
    attempts.clear()
    assert await sub.retry_dead_letter(still)
    assert attempts == {"poison": 1} and await store.dead_letters() == []
    assert await store.load_checkpoint("flaky.flaky") == checkpoint
    assert await store.discard_dead_letter(dead.id) is False
    # A replay requested by hand is not cut short by a dead-letter retry.
    await store.set_checkpoint("flaky.flaky", None)
    assert await store.load_checkpoint("flaky.flaky") == 0


async def test_a_rewound_checkpoint_replays_and_the_inbox_stays_empty(store: EventStore) -> None:
    """The checkpoint proves every event up to it handled, so no inbox row is written for them
    (the inbox stays bounded); moving the checkpoint back is a requested replay."""
    service = Service("dup", store, config=FAST)
    calls: list[str] = []

    @service.handles(OrderPlaced)
    async def count(event: OrderPlaced) -> None:
        calls.append(event.order_id)

    head = await place(store, 30)
    async with service.running():
        assert await service.wait_for(head, timeout=10)
    ids = [e.event_id async for e in store.read_all()]
    assert await store.processed_ids("dup.count", ids) == set()
    await store.set_checkpoint("dup.count", 20)
    async with service.running():
        assert await service.wait_for(head, timeout=10)
        assert service.statistics()[0].skipped_duplicates == 0
    assert calls == [str(i) for i in range(30)] + [str(i) for i in range(20, 30)]


async def test_two_runners_of_one_group_never_share_an_event(store: EventStore) -> None:
    calls: list[str] = []

    def make() -> Service:
        service = Service("pair", store, config=FAST)

        @service.handles(OrderPlaced, group="pair.g")
        async def handle(event: OrderPlaced) -> None:
            calls.append(event.order_id)
            await asyncio.sleep(0)  # a yield, so that the two runners could interleave (not a wait)

        return service

    first, second = make(), make()
    async with first.running(), second.running():
        head = await place(store, 60)
        assert await first.wait_for(head, timeout=10)
        states = [s.state for s in first.statistics() + second.statistics()]
        assert states.count("standby") == 1 and set(states) - {"standby"} <= {"live", "catching up"}
    assert sorted(calls, key=int) == [str(i) for i in range(60)]


async def test_bad_declarations() -> None:
    service = Service("bad", "memory://")
    with pytest.raises(InvalidArgument):
        service.handles()
    with pytest.raises(InvalidArgument):
        service.handles(int)  # type: ignore[arg-type]

    @service.handles(OrderPlaced)
    async def h(event: OrderPlaced) -> None: ...

    with pytest.raises(InvalidArgument):
        service.handles(OrderPlaced, group="bad.h")(h)
    with pytest.raises(InvalidArgument):
        service.add_handler(EventHandler())
    with pytest.raises(InvalidArgument):
        Service("")


async def test_stop_finishes_the_event_in_hand_and_commits(store: EventStore) -> None:
    service = Service("slow", store, config=FAST)
    started, finished = asyncio.Event(), []

    @service.handles(OrderPlaced)
    async def slow(event: OrderPlaced, ctx: HandlerContext) -> None:
        started.set()
        await asyncio.sleep(0.3)  # a deliberately slow handler: the stop comes while it works
        ctx.emit("receipts", [InvoiceIssued(order_id=event.order_id)])
        finished.append(event.order_id)

    head = await place(store, 3)
    task = asyncio.create_task(service.run())
    await asyncio.wait_for(started.wait(), 10)
    service.stop()  # while the first event is in flight
    await asyncio.wait_for(task, 10)
    assert finished == ["0"]
    assert await store.load_checkpoint("slow.slow") == 1 < head
    assert await store.stream_version("receipts") == 1
