"""A saga whose commands and replies cross the bus: three services, three stores, one saga."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_until
from tidings import (
    Command,
    Event,
    HandlerContext,
    ManualClock,
    RetryPolicy,
    Saga,
    Service,
    Step,
    SubscriptionConfig,
)
from tidings.bus import Bus, open_bus
from tidings.integration import IntegrationEvent
from tidings.sagas import SagaSummary, list_sagas

FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.05, retry=RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05)
)


class CheckoutRequested(Event):
    __event_type__ = "tests.busaga.CheckoutRequested"
    order_id: str
    quantity: int
    amount: int


class ReserveStock(Command):
    __event_type__ = "tests.busaga.ReserveStock"
    order_id: str
    quantity: int


class ReleaseStock(Command):
    __event_type__ = "tests.busaga.ReleaseStock"
    order_id: str
    quantity: int


class StockReserved(IntegrationEvent):
    __source__ = "inventory"
    __event_type__ = "tests.busaga.StockReserved"
    order_id: str


class OutOfStock(IntegrationEvent):
    __source__ = "inventory"
    __event_type__ = "tests.busaga.OutOfStock"
    order_id: str


class StockReleased(IntegrationEvent):
    __source__ = "inventory"
    __event_type__ = "tests.busaga.StockReleased"
    order_id: str


class ChargeCard(Command):
    __event_type__ = "tests.busaga.ChargeCard"
    order_id: str
    amount: int


class PaymentCaptured(IntegrationEvent):
    __source__ = "payments"
    __event_type__ = "tests.busaga.PaymentCaptured"
    order_id: str


class PaymentDeclined(IntegrationEvent):
    __source__ = "payments"
    __event_type__ = "tests.busaga.PaymentDeclined"
    order_id: str


class Checkout(Saga):
    name = "busckout"
    started_by = CheckoutRequested
    steps = (
        Step(
            "reserve",
            to="inventory",
            command=lambda d: ReserveStock(order_id=d["order_id"], quantity=d["quantity"]),
            success=StockReserved,
            failure=OutOfStock,
            compensation=lambda d: ReleaseStock(order_id=d["order_id"], quantity=d["quantity"]),
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


async def test_a_saga_drives_other_services_over_the_bus(tmp_path: Path, bus: Bus) -> None:
    stock = {"units": 12}
    calls: Counter[str] = Counter()
    orders = Service("orders", f"sqlite:///{tmp_path}/orders.db", bus=bus, config=FAST)
    orders.add_saga(Checkout(), clock=ManualClock())
    inventory = Service("inventory", f"sqlite:///{tmp_path}/inventory.db", bus=bus, config=FAST)
    inventory.publishes(StockReserved, OutOfStock, StockReleased)
    payments = Service("payments", f"sqlite:///{tmp_path}/payments.db", bus=bus, config=FAST)
    payments.publishes(PaymentCaptured, PaymentDeclined)

    @inventory.handles_command(ReserveStock)
    async def reserve(command: ReserveStock, ctx: HandlerContext) -> None:
        calls["reserve"] += 1
        if command.quantity > stock["units"]:
            ctx.emit(f"stock-{command.order_id}", [OutOfStock(order_id=command.order_id)])
        else:
            stock["units"] -= command.quantity
            ctx.emit(f"stock-{command.order_id}", [StockReserved(order_id=command.order_id)])

    @inventory.handles_command(ReleaseStock)
    async def release(command: ReleaseStock, ctx: HandlerContext) -> None:
        calls["release"] += 1
        stock["units"] += command.quantity
        ctx.emit(f"stock-{command.order_id}", [StockReleased(order_id=command.order_id)])

    @payments.handles_command(ChargeCard)
    async def charge(command: ChargeCard, ctx: HandlerContext) -> None:
        calls["charge"] += 1
        reply = PaymentDeclined if command.amount > 100 else PaymentCaptured
        ctx.emit(f"payment-{command.order_id}", [reply(order_id=command.order_id)])

    async with orders, inventory, payments, orders.running(), inventory.running(), payments.running():
        for i in range(10):
            amount = 500 if i % 3 == 0 else 50
            await orders.publish(
                f"checkout-{i}", [CheckoutRequested(order_id=str(i), quantity=2, amount=amount)]
            )

        async def all_settled() -> list[SagaSummary] | None:
            summaries = await list_sagas(orders.store)
            return summaries if len(summaries) == 10 and all(s.terminal for s in summaries) else None

        summaries = await wait_until(all_settled, 30, "10 sagas to settle")
    states = Counter(s.status for s in summaries)
    assert sum(states.values()) == 10 and set(states) <= {"completed", "compensated"}, states
    declined = sum(1 for s in summaries if s.reason == "charge: PaymentDeclined")
    out_of_stock = sum(1 for s in summaries if s.reason == "reserve: OutOfStock")
    assert declined + out_of_stock == states["compensated"]
    # Stock is conserved: only completed orders hold units; every declined order's were released.
    assert stock["units"] == 12 - 2 * states["completed"]
    assert calls["release"] == declined and calls["charge"] == states["completed"] + declined
    assert calls["reserve"] == 10  # each step ran once per saga, over an at-least-once bus
