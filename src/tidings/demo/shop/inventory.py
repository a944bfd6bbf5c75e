"""Inventory: stock per SKU, reserved per order, never oversold.

A :class:`StockItem` is an aggregate per SKU, loaded and saved through the handler context: two
orders of the same SKU handled at once (two bus partitions, or two Inventory processes) are two
saves at the same version, and the second is refused and handled again on fresh state -- so the
check "enough left?" and the reservation are one atomic step.

* **choreography** -- :func:`wire_choreography`: reserve on ``OrderSubmitted``, release on
  ``PaymentDeclined`` (a compensation by reaction);
* **orchestration** -- :func:`wire_orchestration`: the same logic behind the commands
  ``ReserveStock`` / ``ReleaseStock`` sent by the checkout saga.
"""

from __future__ import annotations

from tidings.aggregate import Aggregate
from tidings.bus.base import Bus
from tidings.errors import InvalidArgument
from tidings.events import Event
from tidings.processing.context import HandlerContext
from tidings.repository import Repository
from tidings.service import Service
from tidings.store.base import EventStore

from .contracts import (
    OrderSubmitted,
    PaymentDeclined,
    ReleaseStock,
    ReserveStock,
    StockReleased,
    StockReserved,
    StockUnavailable,
)
from .wiring import Wiring

__all__ = ["NAME", "StockItem", "build", "restock", "stock_stream"]

NAME = "inventory"


class StockRestocked(Event):
    __event_type__ = "shop.inventory.StockRestocked"
    quantity: int


class StockItemReserved(Event):
    __event_type__ = "shop.inventory.StockItemReserved"
    order_id: str
    quantity: int


class StockItemReleased(Event):
    __event_type__ = "shop.inventory.StockItemReleased"
    order_id: str
    quantity: int


class StockItem(Aggregate):
    """``available`` units, and the units held by each order's reservation."""

    available: int = 0
    reservations: dict[str, int] = {}
    released: int = 0

    def restock(self, quantity: int) -> None:
        if quantity <= 0:
            raise InvalidArgument(f"restock needs a positive quantity, got {quantity}")
        self.record(StockRestocked(quantity=quantity))

    def reserve(self, order_id: str, quantity: int) -> bool:
        """Hold ``quantity`` for the order; False (nothing recorded) if not enough is left.
        A second reservation for the same order is a duplicate: it holds nothing more."""
        if order_id in self.reservations:
            return True
        if quantity > self.available:
            return False
        self.record(StockItemReserved(order_id=order_id, quantity=quantity))
        return True

    def release(self, order_id: str) -> int:
        """Give back the order's units; the number released (0 if it held none)."""
        quantity = self.reservations.get(order_id, 0)
        if quantity:
            self.record(StockItemReleased(order_id=order_id, quantity=quantity))
        return quantity

    def apply(self, event: Event) -> None:
        match event:
            case StockRestocked(quantity=quantity):
                self.available += quantity
            case StockItemReserved(order_id=order_id, quantity=quantity):
                self.available -= quantity
                self.reservations = {**self.reservations, order_id: quantity}
            case StockItemReleased(order_id=order_id, quantity=quantity):
                self.available += quantity
                self.released += 1
                self.reservations = {k: v for k, v in self.reservations.items() if k != order_id}


def stock_stream(sku: str) -> str:
    return f"stock-{sku}"


async def restock(store: EventStore, sku: str, quantity: int) -> None:
    """Inventory's admin API: receive ``quantity`` units of ``sku``."""
    repository = Repository(store, StockItem)
    item = await repository.get(stock_stream(sku), create=True)
    item.restock(quantity)
    await repository.save(item)


async def _reserve(ctx: HandlerContext, order_id: str, sku: str, quantity: int) -> tuple[bool, int]:
    item = await ctx.load(StockItem, stock_stream(sku), create=True)
    reserved = item.reserve(order_id, quantity)
    ctx.save(item)
    return reserved, item.available


async def _release(ctx: HandlerContext, order_id: str, sku: str) -> int:
    item = await ctx.load(StockItem, stock_stream(sku), create=True)
    quantity = item.release(order_id)
    ctx.save(item)
    return quantity


def build(store: EventStore | str, bus: Bus | str | None, wiring: Wiring) -> Service:
    inventory = Service(NAME, store, bus=bus, config=wiring.subscription, ack_wait=wiring.ack_wait)
    inventory.publishes(StockReserved, StockUnavailable, StockReleased)
    if wiring.variant == "choreography":
        wire_choreography(inventory)
    else:
        wire_orchestration(inventory)
    return inventory


def wire_choreography(inventory: Service) -> None:
    """Choreography: react to Orders' and Payments' events."""

    @inventory.handles(OrderSubmitted, group="inventory.choreography.reserve")
    async def reserve_stock_when_order_submitted(event: OrderSubmitted, ctx: HandlerContext) -> None:
        reserved, available = await _reserve(ctx, event.order_id, event.sku, event.quantity)
        stream = f"reservation-{event.order_id}"
        if reserved:
            ctx.emit(stream, [StockReserved(**event.model_dump())])
        else:
            ctx.emit(
                stream,
                [
                    StockUnavailable(
                        order_id=event.order_id, sku=event.sku, requested=event.quantity, available=available
                    )
                ],
            )

    @inventory.handles(PaymentDeclined, group="inventory.choreography.release")
    async def release_stock_when_payment_declined(event: PaymentDeclined, ctx: HandlerContext) -> None:
        # The compensation by reaction: nobody asks, Inventory knows what a declined payment means.
        quantity = await _release(ctx, event.order_id, event.sku)
        if quantity:
            ctx.emit(
                f"reservation-{event.order_id}",
                [StockReleased(order_id=event.order_id, sku=event.sku, quantity=quantity)],
            )


def wire_orchestration(inventory: Service) -> None:
    """Orchestration: the saga's commands, answered with events."""

    @inventory.handles_command(ReserveStock, group="inventory.orchestration.reserve")
    async def reserve_stock_on_command(command: ReserveStock, ctx: HandlerContext) -> None:
        reserved, available = await _reserve(ctx, command.order_id, command.sku, command.quantity)
        stream = f"reservation-{command.order_id}"
        if reserved:
            ctx.emit(stream, [StockReserved(**command.model_dump())])
        else:
            ctx.emit(
                stream,
                [
                    StockUnavailable(
                        order_id=command.order_id,
                        sku=command.sku,
                        requested=command.quantity,
                        available=available,
                    )
                ],
            )

    @inventory.handles_command(ReleaseStock, group="inventory.orchestration.release")
    async def release_stock_on_command(command: ReleaseStock, ctx: HandlerContext) -> None:
        quantity = await _release(ctx, command.order_id, command.sku)
        # Always answer: the saga waits for the release before it goes on.
        ctx.emit(
            f"reservation-{command.order_id}",
            [StockReleased(order_id=command.order_id, sku=command.sku, quantity=quantity)],
        )
