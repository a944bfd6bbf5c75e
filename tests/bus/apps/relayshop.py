"""Two services for the multi-process bus tests, run with ``tidings run relayshop:orders`` and
``tidings run relayshop:inventory`` (stores and bus from ``--store``/``--bus``)."""

from __future__ import annotations

from tidings import Event, HandlerContext, RecordedEvent, RetryPolicy, Service, SubscriptionConfig
from tidings.integration import IntegrationEvent

CONFIG = SubscriptionConfig(
    batch_size=50, poll_interval=0.05, retry=RetryPolicy(max_attempts=5, initial_delay=0.01, max_delay=0.1)
)


class OrderPlaced(Event):
    __event_type__ = "relayshop.OrderPlaced"
    sku: str
    quantity: int


class OrderSubmitted(IntegrationEvent):
    __source__ = "orders"
    __event_type__ = "relayshop.OrderSubmitted"
    order_id: str
    sku: str
    quantity: int


orders = Service("orders", config=CONFIG)


@orders.translates(OrderPlaced)
def submitted(event: OrderPlaced, recorded: RecordedEvent) -> OrderSubmitted:
    return OrderSubmitted(order_id=recorded.stream_id, sku=event.sku, quantity=event.quantity)


inventory = Service("inventory", config=CONFIG)


@inventory.handles(OrderSubmitted)
async def reserve(event: OrderSubmitted, ctx: HandlerContext) -> None:
    # An effect in the service's own database, committed with the inbox row: exactly once.
    ctx.execute(
        "INSERT INTO reservations (order_id, sku, quantity) VALUES (?, ?, ?)",
        (event.order_id, event.sku, event.quantity),
    )


@inventory.on_start
async def create_table() -> None:
    await inventory.store.transaction(  # type: ignore[attr-defined]
        lambda tx: tx.execute(
            "CREATE TABLE IF NOT EXISTS reservations (order_id TEXT, sku TEXT, quantity INTEGER)"
        )
    )
