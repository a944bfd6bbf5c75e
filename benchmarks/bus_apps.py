"""The two services of the end-to-end bus scenarios.

Service ``a`` publishes the integration event :class:`OrderShipped`: the benchmark appends it to a's
SQLite store and a's outbox relay (run in the benchmark's process, :func:`publisher`) publishes it
to NATS JetStream. Service ``b`` handles it in another OS process
(``tidings run benchmarks.bus_apps:b --store sqlite:///... --bus nats://...``) and records its effect
with ``ctx.execute`` in its own store -- committed with b's inbox row, so exactly once -- together
with the handler's wall-clock time, from which the benchmark reads throughput and latency.
"""

from __future__ import annotations

import time

from tidings import HandlerContext, RetryPolicy, Service, SubscriptionConfig
from tidings.integration import IntegrationEvent

CONFIG = SubscriptionConfig(retry=RetryPolicy(max_attempts=5, initial_delay=0.05, max_delay=0.5))

EFFECTS = "CREATE TABLE IF NOT EXISTS effects (event_id TEXT PRIMARY KEY, stream_id TEXT, sent REAL, at REAL)"
"""The effect table of every consumer (tidings' b, FastStream's, the scale-out workers)."""


class OrderShipped(IntegrationEvent):
    __source__ = "a"
    __event_type__ = "bench.OrderShipped"
    order_id: str
    sku: str
    quantity: int
    address: str


def shipped(i: int) -> OrderShipped:
    """The i-th event of a workload (about 300 bytes as a CloudEvent)."""
    return OrderShipped(
        order_id=f"order-{i}", sku=f"sku-{i % 97}", quantity=1 + i % 5, address=f"{i} Harbour Road, Leith"
    )


def publisher(store: str, bus: str) -> Service:
    """A fresh service ``a`` (its relay is the only subscription) on ``store`` and ``bus``."""
    a = Service("a", store, bus=bus, config=CONFIG)
    a.publishes(OrderShipped)
    return a


b = Service("b", config=CONFIG)


@b.handles(OrderShipped)
async def record(event: OrderShipped, ctx: HandlerContext) -> None:
    ctx.execute(
        "INSERT INTO effects (event_id, stream_id, sent, at) VALUES (?, ?, ?, ?)",
        (str(ctx.recorded.event_id), ctx.recorded.stream_id, ctx.recorded.timestamp.timestamp(), time.time()),
    )


@b.on_start
async def create_table() -> None:
    await b.store.transaction(lambda tx: tx.execute(EFFECTS))  # type: ignore[attr-defined]
