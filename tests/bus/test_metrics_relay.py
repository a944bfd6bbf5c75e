"""Metrics of the outbox relay and of bus-fed handler groups: on the memory bus, and on a real NATS
server that is stopped while events pile up in the outbox and started again."""

from __future__ import annotations

import asyncio
import http.client
import uuid
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.bus.conftest import ServerFactory
from tests.helpers import wait_until
from tidings import (
    Event,
    MetricsConfig,
    RecordedEvent,
    RetryPolicy,
    Service,
    SubscriptionConfig,
)
from tidings.bus import Bus, open_bus
from tidings.integration import IntegrationEvent
from tidings.testing.servers import free_port

FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.05, retry=RetryPolicy(max_attempts=2, initial_delay=0.001, max_delay=0.01)
)


class OrderPlaced(Event):
    __event_type__ = "tests.metricsbus.OrderPlaced"
    total: int


class OrderSubmitted(IntegrationEvent):
    __source__ = "orders"
    __event_type__ = "tests.metricsbus.OrderSubmitted"
    order_id: str
    total: int


def orders_service(tmp_path: Path, bus: Bus | str) -> Service:
    orders = Service(
        "orders", f"sqlite:///{tmp_path}/orders.db", bus=bus, config=FAST, metrics=MetricsConfig(free_port())
    )

    @orders.translates(OrderPlaced)
    def submitted(event: OrderPlaced, recorded: RecordedEvent) -> OrderSubmitted:
        return OrderSubmitted(order_id=recorded.stream_id, total=event.total)

    return orders


def scrape(service: Service) -> dict[tuple[str, str], float]:
    """The service's samples by (name, group), without the per-state series."""
    assert service.metrics_url is not None
    connection = http.client.HTTPConnection("127.0.0.1", int(service.metrics_url.split(":")[2].split("/")[0]))
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        text = response.read().decode()
        assert response.status == 200, text
    finally:
        connection.close()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("service") == service.name and "state" not in sample.labels:
                out[(sample.name, sample.labels.get("group", ""))] = sample.value
    return out


async def when(service: Service, **expected: float) -> dict[tuple[str, str], float]:
    """Scrape until the service-level samples (no group) have the expected values."""

    async def check() -> dict[tuple[str, str], float] | None:
        found = await asyncio.to_thread(scrape, service)
        return found if all(found.get((name, "")) == value for name, value in expected.items()) else None

    return await wait_until(check, 60, f"{service.name} metrics {expected}")


async def test_relay_and_bus_groups_on_the_memory_bus(tmp_path: Path) -> None:
    async with open_bus("memory://") as bus:
        orders = orders_service(tmp_path, bus)
        inventory = Service(
            "inventory",
            f"sqlite:///{tmp_path}/inventory.db",
            bus=bus,
            config=FAST,
            metrics=MetricsConfig(free_port()),
        )

        @inventory.handles(OrderSubmitted)
        async def reserve(event: OrderSubmitted) -> None:
            if event.order_id == "order-3":
                raise RuntimeError("no stock for order-3")

        async with orders.running(), inventory.running():
            for i in range(4):
                await orders.publish(f"order-{i}", [OrderPlaced(total=i)])
            found = await when(orders, tidings_relay_published_total=4, tidings_relay_backlog=0)
            assert found[("tidings_group_lag", "orders.relay")] == 0
            assert found[("tidings_group_handled_total", "orders.relay")] == 4

            async def consumed() -> dict[tuple[str, str], float] | None:
                got = await asyncio.to_thread(scrape, inventory)
                group = "inventory.reserve@bus"
                done = got.get(("tidings_group_handled_total", group)) == 3
                return got if done and got.get(("tidings_group_dead_letters", group)) == 1 else None

            got = await wait_until(consumed, 60, "inventory to handle three orders and park one")
            assert got[("tidings_group_alive", "inventory.reserve@bus")] == 1
            assert got[("tidings_group_dead_lettered_total", "inventory.reserve@bus")] == 1
            assert got[("tidings_group_retries_total", "inventory.reserve@bus")] >= 1  # redelivered
            # A bus-fed group has no position in this store's log: no lag is made up for it.
            assert ("tidings_group_lag", "inventory.reserve@bus") not in got
            # Relay series only where a relay runs (inventory runs one if the registry knows a
            # command type, as it does when other tests' commands are loaded).
            assert (("tidings_relay_backlog", "") in got) == (inventory.relay is not None)


async def test_relay_backlog_grows_while_nats_is_down(
    tmp_path: Path, nats_servers_factory: ServerFactory
) -> None:
    server = nats_servers_factory.single()
    orders = orders_service(tmp_path, f"{server.url}?prefix=t{uuid.uuid4().hex[:10]}")
    async with orders.running():
        for i in range(3):
            await orders.publish(f"order-{i}", [OrderPlaced(total=i)])
        await when(orders, tidings_relay_published_total=3, tidings_relay_backlog=0)

        await asyncio.to_thread(server.stop)
        assert not server.running
        for i in range(3, 5):
            await orders.publish(f"order-{i}", [OrderPlaced(total=i)])
        # Nothing can be published (no broker to acknowledge it): the two wait in the outbox.
        found = await asyncio.to_thread(scrape, orders)
        assert found[("tidings_relay_backlog", "")] == 2
        assert found[("tidings_relay_published_total", "")] == 3
        assert found[("tidings_group_lag", "orders.relay")] == 2

        await asyncio.to_thread(server.start)
        await when(orders, tidings_relay_published_total=5, tidings_relay_backlog=0)
