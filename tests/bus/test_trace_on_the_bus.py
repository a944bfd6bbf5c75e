"""The causal trace of a saga whose commands and replies cross the bus: three services, three
stores, one tree -- on the memory bus and on NATS JetStream (the ids survive the wire format)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until
from tidings import (
    CausalTrace,
    Command,
    Event,
    HandlerContext,
    ManualClock,
    RetryPolicy,
    Saga,
    Service,
    Step,
    SubscriptionConfig,
    TraceNode,
    build_trace,
)
from tidings.bus import Bus, open_bus
from tidings.integration import IntegrationEvent
from tidings.sagas import list_sagas

FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.05, retry=RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05)
)


class CheckoutRequested(Event):
    __event_type__ = "tests.bustrace.CheckoutRequested"
    order_id: str
    amount: int


class ReserveStock(Command):
    __event_type__ = "tests.bustrace.ReserveStock"
    order_id: str


class ReleaseStock(Command):
    __event_type__ = "tests.bustrace.ReleaseStock"
    order_id: str


class StockReserved(IntegrationEvent):
    __source__ = "inventory"
    __event_type__ = "tests.bustrace.StockReserved"
    order_id: str


class StockReleased(IntegrationEvent):
    __source__ = "inventory"
    __event_type__ = "tests.bustrace.StockReleased"
    order_id: str


class ChargeCard(Command):
    __event_type__ = "tests.bustrace.ChargeCard"
    order_id: str
    amount: int


class PaymentCaptured(IntegrationEvent):
    __source__ = "payments"
    __event_type__ = "tests.bustrace.PaymentCaptured"
    order_id: str


class PaymentDeclined(IntegrationEvent):
    __source__ = "payments"
    __event_type__ = "tests.bustrace.PaymentDeclined"
    order_id: str


class Checkout(Saga):
    name = "bustrace"
    started_by = CheckoutRequested
    steps = (
        Step(
            "reserve",
            to="inventory",
            command=lambda d: ReserveStock(order_id=d["order_id"]),
            success=StockReserved,
            compensation=lambda d: ReleaseStock(order_id=d["order_id"]),
            compensated_by=StockReleased,
            timeout=60,
        ),
        Step(
            "charge",
            to="payments",
            command=lambda d: ChargeCard(order_id=d["order_id"], amount=d["amount"]),
            success=PaymentCaptured,
            failure=PaymentDeclined,
            timeout=60,
        ),
    )

    def start(self, event: Event) -> tuple[str, Mapping[str, Any]]:
        assert isinstance(event, CheckoutRequested)
        return event.order_id, event.model_dump()


@pytest.fixture(params=["memory", "nats"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    url = "memory://" if request.param == "memory" else request.getfixturevalue("nats_url")
    async with open_bus(url) as bus:
        yield bus


def one(trace: CausalTrace, short_type: str) -> TraceNode:
    [node] = [n for n in trace.nodes() if n.event_type.rsplit(".", 1)[-1] == short_type]
    return node


async def test_a_compensated_saga_across_three_stores_is_one_tree(tmp_path: Path, bus: Bus) -> None:
    orders = Service("orders", f"sqlite:///{tmp_path}/orders.db", bus=bus, config=FAST)
    orders.add_saga(Checkout(), clock=ManualClock())
    inventory = Service("inventory", f"sqlite:///{tmp_path}/inventory.db", bus=bus, config=FAST)
    inventory.publishes(StockReserved, StockReleased)
    payments = Service("payments", f"sqlite:///{tmp_path}/payments.db", bus=bus, config=FAST)
    payments.publishes(PaymentCaptured, PaymentDeclined)

    @inventory.handles_command(ReserveStock)
    async def reserve(command: ReserveStock, ctx: HandlerContext) -> None:
        ctx.emit(f"stock-{command.order_id}", [StockReserved(order_id=command.order_id)])

    @inventory.handles_command(ReleaseStock)
    async def release(command: ReleaseStock, ctx: HandlerContext) -> None:
        ctx.emit(f"stock-{command.order_id}", [StockReleased(order_id=command.order_id)])

    @payments.handles_command(ChargeCard)
    async def charge(command: ChargeCard, ctx: HandlerContext) -> None:
        reply = PaymentDeclined if command.amount > 100 else PaymentCaptured
        ctx.emit(f"payment-{command.order_id}", [reply(order_id=command.order_id)])

    async with orders, inventory, payments, orders.running(), inventory.running(), payments.running():
        await orders.publish("checkout-1", [CheckoutRequested(order_id="1", amount=500)])
        await orders.publish("checkout-2", [CheckoutRequested(order_id="2", amount=50)])

        async def settled() -> bool:
            summaries = await list_sagas(orders.store)
            return len(summaries) == 2 and all(s.terminal for s in summaries)

        await wait_until(settled, 30, "both sagas to settle")
        sources = {"orders": orders.store, "inventory": inventory.store, "payments": payments.store}
        declined = await build_trace(sources, "checkout-1")
        completed = await build_trace(sources, "checkout-2")

    assert len(declined.roots) == 1 and declined.roots[0].event_type.endswith("CheckoutRequested")
    assert declined.roots[0].service == "orders"  # published by the service: stamped
    assert set(declined.services) == {"orders", "inventory", "payments"}
    # The command crossed the bus; the event its handler emitted in the other store hangs under it.
    command = one(declined, "ReserveStock")
    reserved = one(declined, "StockReserved")
    assert command.source == "orders" and reserved.source == "inventory"
    assert reserved.causation_id == command.event_id and reserved in command.children
    assert reserved.caused_by == "handler:inventory.reserve" and reserved.service == "inventory"
    assert command.caused_by == "saga:bustrace.reserve"
    assert one(declined, "PaymentDeclined").service == "payments"
    # The compensation, flagged on both sides of the bus.
    compensating = one(declined, "ReleaseStock")
    released = one(declined, "StockReleased")
    assert compensating.compensation and released.compensation and released in compensating.children
    assert released.caused_by == "handler:inventory.release"
    assert not command.compensation and not reserved.compensation
    # The other order: no compensation anywhere, and nothing of order 1 in its tree.
    assert not any(n.compensation for n in completed.nodes())
    assert {n.event_id for n in completed.nodes()}.isdisjoint({n.event_id for n in declined.nodes()})
    assert one(completed, "PaymentCaptured").source == "payments"
