"""Services that each own a store and talk only through the bus: domain events translated to
integration events, published by the outbox relay, handled by another service with
``@service.handles`` exactly once in effect; on the memory bus and on NATS JetStream."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tidings import Event, HandlerContext, RecordedEvent, RetryPolicy, Service, SubscriptionConfig
from tidings.bus import Bus, open_bus
from tidings.bus.inbound import inbox_group
from tidings.bus.relay import translated_id
from tidings.integration import IntegrationEvent

FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.05, retry=RetryPolicy(max_attempts=2, initial_delay=0.001, max_delay=0.01)
)


class OrderPlaced(Event):
    """Orders' domain event: internal, free to change."""

    __event_type__ = "tests.svcbus.OrderPlaced"
    customer: str
    total_cents: int
    internal_note: str


class OrderSubmitted(IntegrationEvent):
    """Orders' public contract."""

    __source__ = "orders"
    __event_type__ = "tests.svcbus.OrderSubmitted"
    order_id: str
    total: int


class StockReserved(IntegrationEvent):
    __source__ = "inventory"
    __event_type__ = "tests.svcbus.StockReserved"
    order_id: str


class OrderAccepted(Event):
    __event_type__ = "tests.svcbus.OrderAccepted"


@pytest.fixture(params=["memory", "nats"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    url = "memory://" if request.param == "memory" else request.getfixturevalue("nats_url")
    async with open_bus(url) as bus:
        yield bus


def build(tmp_path: Path, bus: Bus, seen: Counter[str]) -> tuple[Service, Service]:
    orders = Service("orders", f"sqlite:///{tmp_path}/orders.db", bus=bus, config=FAST)
    inventory = Service("inventory", f"sqlite:///{tmp_path}/inventory.db", bus=bus, config=FAST)

    @orders.translates(OrderPlaced)
    def submitted(event: OrderPlaced, recorded: RecordedEvent) -> OrderSubmitted:
        return OrderSubmitted(order_id=recorded.stream_id, total=event.total_cents // 100)

    @inventory.handles(OrderSubmitted)
    async def reserve(event: OrderSubmitted, ctx: HandlerContext) -> None:
        seen[event.order_id] += 1
        ctx.emit(f"reservation-{event.order_id}", [StockReserved(order_id=event.order_id)])

    inventory.publishes(StockReserved)

    @orders.handles(StockReserved)
    async def accept(event: StockReserved, ctx: HandlerContext) -> None:
        ctx.emit(event.order_id, [OrderAccepted()])

    return orders, inventory


async def test_translate_publish_consume_reply(tmp_path: Path, bus: Bus) -> None:
    seen: Counter[str] = Counter()
    orders, inventory = build(tmp_path, bus, seen)
    async with orders, inventory, orders.running(), inventory.running():
        for i in range(20):
            await orders.publish(
                f"order-{i}", [OrderPlaced(customer="ada", total_cents=1000 + i, internal_note="vip")]
            )

        async def all_accepted() -> bool:
            found = [e async for e in orders.store.read_all(event_types=[OrderAccepted])]
            return len(found) == 20

        await wait_until(all_accepted)
        # The integration event went over the bus with an id derived from the domain event's id,
        # and its causation is the domain event: the trace can join the two stores.
        placed = [e async for e in orders.store.read_all(event_types=[OrderPlaced])]
        reservations = [e async for e in inventory.store.read_all(event_types=[StockReserved])]
        assert len(reservations) == 20
        by_order = {e.event.order_id: e for e in reservations}  # type: ignore[union-attr]
        for domain in placed:
            emitted = by_order[domain.stream_id]
            assert emitted.metadata["causation_id"] == str(translated_id(domain.event_id))
            assert emitted.correlation_id == str(domain.event_id)
        stats = {s.group: s for s in inventory.statistics()}
        assert stats["inventory.reserve@bus"].handled == 20 and stats["inventory.reserve@bus"].state == "live"
        # The internal field never left the service: inventory's store has no OrderPlaced at all.
        assert [e async for e in inventory.store.read_all(event_types=[OrderPlaced])] == []
    assert seen == {f"order-{i}": 1 for i in range(20)}


async def test_redelivered_messages_are_absorbed_by_the_inbox(tmp_path: Path, bus: Bus) -> None:
    """The relay publishes everything again (its checkpoint reset): the bus drops what it holds
    by id, and whatever gets through is skipped by the consumer's inbox -- effects stay once."""
    seen: Counter[str] = Counter()
    orders, inventory = build(tmp_path, bus, seen)
    async with orders, inventory:
        async with orders.running(), inventory.running():
            for i in range(5):
                await orders.publish(
                    f"order-{i}", [OrderPlaced(customer="x", total_cents=100, internal_note="")]
                )

            async def reserved() -> bool:
                found = [e async for e in inventory.store.read_all(event_types=[StockReserved])]
                return len(found) == 5

            await wait_until(reserved)
        await orders.store.set_checkpoint("orders.relay", 0)
        async with orders.running(), inventory.running():
            assert await orders.wait_for(await orders.store.head(), group="orders.relay")
            # The fault happened: the relay really published the five orders again.
            [relay] = [s for s in orders.statistics() if s.group == "orders.relay"]
            assert relay.handled >= 5, relay
            # One more order proves the pipeline is live after the re-publish.
            await orders.publish("order-new", [OrderPlaced(customer="x", total_cents=100, internal_note="")])

            async def six() -> bool:
                found = [e async for e in inventory.store.read_all(event_types=[StockReserved])]
                return len(found) == 6

            await wait_until(six)
        ids = [e.event_id async for e in orders.store.read_all(event_types=[OrderPlaced])]
        assert (
            len(
                await inventory.store.processed_ids(
                    inbox_group("inventory.reserve"), [translated_id(i) for i in ids]
                )
            )
            == 6
        )
    assert set(seen.values()) == {1}


async def test_a_message_that_keeps_failing_is_dead_lettered_in_the_consuming_service(
    tmp_path: Path, bus: Bus
) -> None:
    from tidings.bus import DeliveryPolicy  # noqa: F401  (documents where the retry policy lives)

    orders = Service("orders", f"sqlite:///{tmp_path}/o.db", bus=bus, config=FAST)
    inventory = Service("inventory", f"sqlite:///{tmp_path}/i.db", bus=bus, config=FAST)
    orders.publishes(OrderSubmitted)

    @inventory.handles(OrderSubmitted)
    async def broken(event: OrderSubmitted) -> None:
        if event.total == 13:
            raise ValueError("unlucky order")

    async with orders, inventory, orders.running(), inventory.running():
        await orders.publish("o-13", [OrderSubmitted(order_id="o-13", total=13)])
        await orders.publish("o-14", [OrderSubmitted(order_id="o-14", total=14)])

        async def parked() -> bool:
            return len(await inventory.store.dead_letters()) == 1

        await wait_until(parked, timeout=60)
        [dead] = await inventory.store.dead_letters()
        assert dead.group == inbox_group("inventory.broken")
        assert "from the bus" in dead.error and "unlucky order" in dead.error
