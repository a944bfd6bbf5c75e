"""A small system for the console's tests: an order starts a one-step saga (charge the card), a
billing handler sends receipts -- and fails for order 2 while ``World.broken``, which parks it.

:func:`seed` runs it on a store until it settles and says where things are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from tidings import (
    Command,
    Event,
    EventStore,
    HandlerContext,
    ManualClock,
    RetryPolicy,
    Saga,
    Service,
    Step,
    SubscriptionConfig,
    open_store,
)
from tidings.sagas import saga_state

FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.02, retry=RetryPolicy(max_attempts=1, initial_delay=0.001, max_delay=0.01)
)


class OrderPlaced(Event):
    __event_type__ = "webtest.OrderPlaced"
    order_id: str
    amount: int


class ChargeCard(Command):
    __event_type__ = "webtest.ChargeCard"
    order_id: str
    amount: int


class CardCharged(Event):
    __event_type__ = "webtest.CardCharged"
    order_id: str


class ReceiptSent(Event):
    __event_type__ = "webtest.ReceiptSent"
    order_id: str


class Checkout(Saga):
    name = "checkout"
    started_by = OrderPlaced
    steps = (
        Step(
            "charge",
            to="payments",
            command=lambda d: ChargeCard(order_id=d["order_id"], amount=d["amount"]),
            success=CardCharged,
        ),
    )

    def start(self, event: Event) -> tuple[str, Mapping[str, Any]]:
        assert isinstance(event, OrderPlaced)
        return event.order_id, {"order_id": event.order_id, "amount": event.amount}


class Switch:
    """Whether billing is broken (it fails for order 2)."""

    def __init__(self, broken: bool = True) -> None:
        self.broken = broken


class World(Switch):
    """The three services on one store; ``broken`` makes billing fail for order 2."""

    def __init__(self, store: EventStore | str) -> None:
        super().__init__(broken=True)
        self.orders = Service("orders", store, config=FAST)
        self.orders.add_saga(Checkout(), clock=ManualClock())
        self.payments = Service("payments", store, config=FAST)
        self.billing = billing_service(store, self)

        @self.payments.handles_command(ChargeCard)
        async def charge(command: ChargeCard, ctx: HandlerContext) -> None:
            ctx.emit(f"payment-{command.order_id}", [CardCharged(order_id=command.order_id)])

    def services(self) -> list[Service]:
        return [self.orders, self.payments, self.billing]


def billing_service(store: EventStore | str | None, world: Switch) -> Service:
    """The service whose handler parks order 2 while ``world.broken`` (retried from the console)."""
    billing = Service("billing", store, config=FAST)

    @billing.handles(CardCharged)
    async def receipt(event: CardCharged, ctx: HandlerContext) -> None:
        if world.broken and event.order_id == "2":
            raise ValueError("the mail server refused the receipt")
        ctx.emit(f"receipt-{event.order_id}", [ReceiptSent(order_id=event.order_id)])

    return billing


@dataclasses.dataclass(frozen=True)
class Seeded:
    """Where the seeded things are."""

    order_ids: dict[str, str]
    """Event id of each ``OrderPlaced``, by order id."""
    dead_letter: int
    saga_id: str
    head: int


async def seed(url: str) -> Seeded:
    """Run the system on the store at ``url`` for orders 1 and 2, until both sagas completed and
    billing processed everything (order 2's receipt parked); close the store."""
    async with open_store(url) as store:
        world = World(store)
        for order in ("1", "2"):
            await store.append(f"order-{order}", [OrderPlaced(order_id=order, amount=10 * int(order))])
        stack = [service.running() for service in world.services()]
        for cm in stack:
            await cm.__aenter__()
        try:
            for _ in range(200):
                head = await store.head()
                states = [(await saga_state(store, f"saga-checkout-{o}")).status for o in ("1", "2")]
                settled = states == ["completed", "completed"]
                if settled and await world.billing.wait_for(head, timeout=0.1) and await store.head() == head:
                    break
                await store.wait_for_append(head, timeout=0.05)
            else:
                raise AssertionError("the test system did not settle")
        finally:
            for cm in reversed(stack):
                await cm.__aexit__(None, None, None)
        [dead] = await store.dead_letters()  # type: ignore[attr-defined]
        order_ids = {}
        async for recorded in store.read_all(event_types=[OrderPlaced]):
            assert isinstance(recorded.event, OrderPlaced)
            order_ids[recorded.event.order_id] = str(recorded.event_id)
        return Seeded(order_ids, dead.id, "saga-checkout-1", await store.head())
