"""Orders: takes orders, owns their state, and decides when an order is confirmed or rejected.

Patterns, by name in this module:

* **domain vs integration events** -- :class:`OrderPlaced`, :class:`OrderCompleted` and
  :class:`OrderCancelled` are Orders' private domain events (with internal fields such as the risk
  score and the sales channel); :func:`wire_translations` maps them to the public
  :class:`~.contracts.OrderSubmitted`, :class:`~.contracts.OrderConfirmed` and
  :class:`~.contracts.OrderRejected` with ``@orders.translates``;
* **choreography** -- :func:`wire_choreography`: Orders reacts to what the other services
  announce (``OrderShipped`` confirms, ``StockUnavailable`` / ``PaymentDeclined`` reject);
* **orchestration** -- :func:`wire_orchestration`: the :func:`~.orchestration.checkout_saga` runs
  here and Orders follows its outcome;
* **event notification** -- the query API (:class:`OrderQueries`) that Email calls back for the
  details of a thin ``OrderConfirmed``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from tidings.aggregate import Aggregate
from tidings.bus.base import Bus
from tidings.errors import AggregateNotFound, InvalidArgument
from tidings.events import Event, RecordedEvent
from tidings.processing.context import HandlerContext
from tidings.repository import Repository
from tidings.sagas.clock import Clock
from tidings.sagas.state import SagaCompensated, SagaCompleted, SagaFailed
from tidings.service import Service
from tidings.store.base import EventStore
from tidings.store.tracking import SQLStore, require

from .contracts import (
    OrderConfirmed,
    OrderRejected,
    OrderShipped,
    OrderSubmitted,
    PaymentDeclined,
    StockUnavailable,
)
from .orchestration import SAGA_PREFIX, checkout_saga, outcome_of_saga
from .wiring import Wiring

__all__ = [
    "NAME",
    "Order",
    "OrderCancelled",
    "OrderCompleted",
    "OrderPlaced",
    "OrderQueries",
    "build",
    "place_order",
    "prepare_store",
]

NAME = "orders"

TERMINAL = ("confirmed", "rejected", "failed")

READ_MODEL_DDL = (
    "CREATE TABLE IF NOT EXISTS shop_orders (order_id TEXT PRIMARY KEY, status TEXT NOT NULL, "
    "reason TEXT, amount INTEGER NOT NULL, placed_at DOUBLE PRECISION NOT NULL, "
    "decided_at DOUBLE PRECISION)"
)

# -- domain events: private to Orders --------------------------------------------------------------------


class OrderPlaced(Event):
    """Internal: carries what only Orders cares about (channel, risk score, the customer's e-mail)."""

    __event_type__ = "shop.orders.OrderPlaced"
    order_id: str
    customer_id: str
    customer_name: str
    customer_email: str
    sku: str
    quantity: int
    unit_price: int
    amount: int
    card: str
    placed_at: float
    channel: str = "web"
    risk_score: int = 0


class OrderCompleted(Event):
    __event_type__ = "shop.orders.OrderCompleted"
    at: float


class OrderCancelled(Event):
    """``reason`` is the outcome category (``out_of_stock``, ``payment_declined``,
    ``payment_timeout``...); ``detail`` says what exactly happened."""

    __event_type__ = "shop.orders.OrderCancelled"
    reason: str
    detail: str
    at: float
    failed: bool = False


class Order(Aggregate):
    """An order: placed, then confirmed or rejected exactly once (later news changes nothing)."""

    status: str = "new"
    customer_id: str = ""
    customer_name: str = ""
    customer_email: str = ""
    sku: str = ""
    quantity: int = 0
    amount: int = 0
    reason: str | None = None

    def place(self, placed: OrderPlaced) -> None:
        if self.status != "new":
            raise InvalidArgument(f"order {self.id!r} is already placed")
        self.record(placed)

    def confirm(self) -> bool:
        if self.status != "placed":
            return False
        self.record(OrderCompleted(at=time.time()))
        return True

    def reject(self, reason: str, detail: str, *, failed: bool = False) -> bool:
        if self.status != "placed":
            return False
        self.record(OrderCancelled(reason=reason, detail=detail, at=time.time(), failed=failed))
        return True

    def apply(self, event: Event) -> None:
        match event:
            case OrderPlaced() as placed:
                self.status = "placed"
                self.customer_id, self.customer_name = placed.customer_id, placed.customer_name
                self.customer_email, self.sku = placed.customer_email, placed.sku
                self.quantity, self.amount = placed.quantity, placed.amount
            case OrderCompleted():
                self.status = "confirmed"
            case OrderCancelled(reason=reason, failed=failed):
                self.status, self.reason = ("failed" if failed else "rejected"), reason


# -- the order-taking API (what the shop front end calls) ------------------------------------------------


async def prepare_store(store: EventStore) -> None:
    """Create Orders' read model table (idempotent)."""
    await require(store, SQLStore, "Orders").transaction(lambda tx: tx.execute(READ_MODEL_DDL))


async def place_order(store: EventStore, order_id: str, placed: OrderPlaced) -> None:
    """Place an order: one ``OrderPlaced`` in the order's own stream."""
    order = Order(order_id)
    order.place(placed)
    await Repository(store, Order).save(order)


@dataclasses.dataclass(frozen=True)
class OrderDetails:
    order_id: str
    status: str
    customer_name: str
    customer_email: str
    sku: str
    quantity: int
    amount: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class OrderQueries:
    """Orders' query API: what other services may ask (a function call in one process, or over
    HTTP with :mod:`.orders_api` when the services run as processes)."""

    def __init__(self, store: EventStore) -> None:
        self.store = require(store, SQLStore, "the Orders query API")
        self._orders = Repository(store, Order)

    async def details(self, order_id: str) -> OrderDetails | None:
        try:
            order = await self._orders.get(order_id)
        except AggregateNotFound:
            return None
        return OrderDetails(
            order.id,
            order.status,
            order.customer_name,
            order.customer_email,
            order.sku,
            order.quantity,
            order.amount,
        )

    async def statuses(self) -> dict[str, int]:
        rows = await self.store.query("SELECT status, COUNT(*) FROM shop_orders GROUP BY status")
        return {str(status): int(count) for status, count in rows}

    async def outcomes(self) -> list[tuple[str, str, str | None, int, float, float | None]]:
        """(order id, status, reason, amount, placed_at, decided_at) of every order."""
        rows = await self.store.query(
            "SELECT order_id, status, reason, amount, placed_at, decided_at FROM shop_orders "
            "ORDER BY order_id"
        )
        return [
            (str(r[0]), str(r[1]), r[2], int(r[3]), float(r[4]), None if r[5] is None else float(r[5]))
            for r in rows
        ]


# -- wiring -----------------------------------------------------------------------------------------------


def build(
    store: EventStore | str, bus: Bus | str | None, wiring: Wiring, *, clock: Clock | None = None
) -> Service:
    """The Orders service for ``wiring.variant``."""
    orders = Service(NAME, store, bus=bus, config=wiring.subscription, ack_wait=wiring.ack_wait)
    wire_translations(orders)
    wire_read_model(orders)
    if wiring.variant == "choreography":
        wire_choreography(orders)
    else:
        wire_orchestration(orders, wiring, clock)
    return orders


def wire_translations(orders: Service) -> None:
    """Domain vs integration events: what Orders publishes is a mapping of what it records."""

    @orders.translates(OrderPlaced)
    def order_submitted(event: OrderPlaced, recorded: RecordedEvent) -> OrderSubmitted:
        # The channel, risk score and e-mail address stay inside Orders.
        return OrderSubmitted(
            order_id=recorded.stream_id,
            customer_id=event.customer_id,
            sku=event.sku,
            quantity=event.quantity,
            amount=event.amount,
            card=event.card,
        )

    @orders.translates(OrderCompleted)
    def order_confirmed(event: OrderCompleted, recorded: RecordedEvent) -> OrderConfirmed:
        return OrderConfirmed(order_id=recorded.stream_id)  # thin: an event notification

    @orders.translates(OrderCancelled)
    def order_rejected(event: OrderCancelled, recorded: RecordedEvent) -> OrderRejected:
        return OrderRejected(order_id=recorded.stream_id, reason=event.reason)


def wire_read_model(orders: Service) -> None:
    """The ``shop_orders`` table behind the query API, kept by a local handler group."""

    @orders.handles(OrderPlaced, OrderCompleted, OrderCancelled, group="orders.read_model")
    async def order_list(event: Event, ctx: HandlerContext) -> None:
        order_id = ctx.recorded.stream_id
        match event:
            case OrderPlaced(amount=amount, placed_at=placed_at):
                ctx.execute(
                    "INSERT INTO shop_orders (order_id, status, amount, placed_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (order_id) DO NOTHING",
                    (order_id, "placed", amount, placed_at),
                )
            case OrderCompleted(at=at):
                ctx.execute(
                    "UPDATE shop_orders SET status = ?, decided_at = ? WHERE order_id = ?",
                    ("confirmed", at, order_id),
                )
            case OrderCancelled(reason=reason, at=at, failed=failed):
                ctx.execute(
                    "UPDATE shop_orders SET status = ?, reason = ?, decided_at = ? WHERE order_id = ?",
                    ("failed" if failed else "rejected", reason, at, order_id),
                )


def wire_choreography(orders: Service) -> None:
    """Choreography: Orders confirms or rejects on what the others announce; nobody directs."""

    @orders.handles(OrderShipped, group="orders.choreography.confirm")
    async def confirm_order_when_shipped(event: OrderShipped, ctx: HandlerContext) -> None:
        order = await ctx.load(Order, event.order_id)
        if order.confirm():
            ctx.save(order)

    @orders.handles(StockUnavailable, group="orders.choreography.out_of_stock")
    async def reject_order_when_out_of_stock(event: StockUnavailable, ctx: HandlerContext) -> None:
        order = await ctx.load(Order, event.order_id)
        if order.reject("out_of_stock", f"{event.sku}: {event.available} left, {event.requested} wanted"):
            ctx.save(order)

    @orders.handles(PaymentDeclined, group="orders.choreography.declined")
    async def reject_order_when_payment_declined(event: PaymentDeclined, ctx: HandlerContext) -> None:
        order = await ctx.load(Order, event.order_id)
        if order.reject(f"payment_{event.reason}", f"payment {event.reason}"):
            ctx.save(order)


def wire_orchestration(orders: Service, wiring: Wiring, clock: Clock | None) -> None:
    """Orchestration: the checkout saga runs in Orders; Orders follows the saga's outcome."""
    orders.add_saga(checkout_saga(OrderPlaced, wiring.payment_timeout), clock=clock)

    @orders.handles(SagaCompleted, SagaCompensated, SagaFailed, group="orders.orchestration.outcome")
    async def settle_order_when_checkout_ends(event: Event, ctx: HandlerContext) -> None:
        stream = ctx.recorded.stream_id
        if not stream.startswith(SAGA_PREFIX):
            return
        order = await ctx.load(Order, stream.removeprefix(SAGA_PREFIX))
        match event:
            case SagaCompleted():
                changed = order.confirm()
            case SagaCompensated(reason=reason):
                changed = order.reject(outcome_of_saga(reason), reason)
            case SagaFailed(reason=reason):
                changed = order.reject("saga_failed", reason, failed=True)
            case _:
                changed = False
        if changed:
            ctx.save(order)
