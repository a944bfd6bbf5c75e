"""Prometheus metrics of a running service, scraped over HTTP from its real endpoint and parsed
with prometheus_client's own parser: on every backend (sagas and projections on the SQL ones)."""

from __future__ import annotations

import asyncio
import http.client
import socket
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_until
from tidings import (
    Command,
    Event,
    EventStore,
    HandlerContext,
    InvalidArgument,
    ManualClock,
    MetricsConfig,
    MetricsError,
    MissingExtra,
    Projection,
    ProjectionTx,
    RetryPolicy,
    Saga,
    Service,
    ServiceMetrics,
    Step,
    SubscriptionConfig,
    TidingsError,
)
from tidings.testing.servers import free_port

FAST = SubscriptionConfig(
    batch_size=50, poll_interval=0.05, retry=RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.01)
)


class OrderPlaced(Event):
    __event_type__ = "tests.metrics.OrderPlaced"
    order_id: str
    amount: int


class InvoiceIssued(Event):
    __event_type__ = "tests.metrics.InvoiceIssued"
    order_id: str


class Scrape:
    """One scrape: every sample by name and labels (``service`` is filled in)."""

    def __init__(self, text: str, service: str) -> None:
        self.text = text
        self.service = service
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def __call__(self, name: str, **labels: str) -> float:
        key = (name, frozenset({"service": self.service, **labels}.items()))
        if key not in self.samples:
            raise AssertionError(f"no sample {name}{labels} in the scrape:\n{self.text}")
        return self.samples[key]

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset({"service": self.service, **labels}.items())) in self.samples


def request(url: str, method: str = "GET", path: str | None = None) -> tuple[int, dict[str, str], str]:
    """One HTTP request to the endpoint (status, headers, body), its connection closed after."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, path or parts.path, body=b"x" if method == "POST" else None)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


async def scrape(service: Service) -> Scrape:
    assert service.metrics_url is not None
    status, headers, text = await asyncio.to_thread(request, service.metrics_url)
    assert status == 200, text
    assert headers["Content-Type"].startswith("text/plain")
    return Scrape(text, service.name)


async def test_appends_groups_retries_and_dead_letters(store: EventStore) -> None:
    port = free_port()
    service = Service("shop", store, config=FAST, metrics=MetricsConfig(port=port))

    @service.handles(OrderPlaced)
    async def invoice(event: OrderPlaced, ctx: HandlerContext) -> None:
        ctx.emit(f"invoice-{event.order_id}", [InvoiceIssued(order_id=event.order_id)])

    @service.handles(OrderPlaced)
    async def picky(event: OrderPlaced) -> None:
        if event.order_id == "3":
            raise ValueError("order 3 is refused")

    assert service.metrics_url is None  # not running: nothing served
    async with service.running():
        assert service.metrics_url == f"http://127.0.0.1:{port}/metrics"
        with pytest.raises(TidingsError, match="is running"):
            service.use_metrics(None)
        for i in range(10):
            await service.publish(f"order-{i}", [OrderPlaced(order_id=str(i), amount=i)])

        async def settled() -> Scrape | None:
            s = await scrape(service)
            done = s("tidings_group_handled_total", group="shop.invoice") == 10
            parked = s("tidings_group_dead_letters", group="shop.picky") == 1
            at_head = all(s("tidings_group_lag", group=g) == 0 for g in ("shop.invoice", "shop.picky"))
            return s if done and parked and at_head else None

        s = await wait_until(settled, what="both groups at the head")
        head = await store.head()
        assert head == 20  # 10 placed + 10 invoices emitted by the handler
        assert s("tidings_head_position") == head
        # The service's appends and the handler's emits, committed with its checkpoint.
        assert s("tidings_appended_events_total") == 20
        assert s("tidings_append_calls_total") == 20
        assert s("tidings_group_checkpoint", group="shop.invoice") == head
        assert s("tidings_group_handled_total", group="shop.picky") == 9
        assert s("tidings_group_retries_total", group="shop.picky") == 2  # 3 attempts
        assert s("tidings_group_dead_lettered_total", group="shop.picky") == 1
        assert s("tidings_group_dead_lettered_total", group="shop.invoice") == 0
        assert s("tidings_group_dead_letters", group="shop.invoice") == 0
        for group in ("shop.invoice", "shop.picky"):
            assert s("tidings_group_alive", group=group) == 1
            assert s("tidings_group_state", group=group, state="live") == 1
            assert s("tidings_group_state", group=group, state="failed") == 0
        assert s.types["tidings_group_handled"] == "counter"
        assert s.types["tidings_group_lag"] == "gauge"
        assert s.types["tidings_appended_events"] == "counter"
        # The process's standard series come from the service's own registry.
        assert any(name.startswith("process_") or name.startswith("python_") for name in s.types)

        # A dead letter discarded by hand leaves the gauge; the counter of new ones stays.
        [dead] = await store.dead_letters("shop.picky")
        assert await store.discard_dead_letter(dead.id)
        s = await scrape(service)
        assert s("tidings_group_dead_letters", group="shop.picky") == 0
        assert s("tidings_group_dead_lettered_total", group="shop.picky") == 1
    assert service.metrics_url is None
    # The port is free again once the service stopped.
    with socket.create_server(("127.0.0.1", port)):
        pass


async def test_lag_shows_history_not_yet_handled(store: EventStore) -> None:
    service = Service("slow", store, config=FAST, metrics=MetricsConfig(port=free_port()))
    release = asyncio.Event()

    @service.handles(OrderPlaced)
    async def wait(event: OrderPlaced) -> None:
        await release.wait()

    for i in range(5):
        await store.append(f"order-{i}", [OrderPlaced(order_id=str(i), amount=i)])
    async with service.running():
        s = await wait_until(
            lambda: _scrape_if(
                service, lambda s: s("tidings_group_state", group="slow.wait", state="catching up")
            ),
            what="the runner catching up",
        )
        assert s("tidings_group_lag", group="slow.wait") == 5
        assert s("tidings_group_handled_total", group="slow.wait") == 0
        release.set()
        s = await wait_until(
            lambda: _scrape_if(
                service,
                lambda s: (
                    s("tidings_group_lag", group="slow.wait") == 0
                    and s("tidings_group_handled_total", group="slow.wait") == 5
                ),
            ),
            what="the lag to drop to 0 with every event handled",
        )
        assert s("tidings_group_state", group="slow.wait", state="live") == 1
        # The store object counts every append made through it, the test's own included.
        assert s("tidings_appended_events_total") == 5


async def _scrape_if(service: Service, check: Any) -> Scrape | None:
    s = await scrape(service)
    return s if check(s) else None


async def test_two_services_in_one_process_keep_their_series_apart(store: EventStore) -> None:
    first = Service("first", store, config=FAST, metrics=MetricsConfig(port=free_port()))
    second = Service("second", store, config=FAST, metrics=MetricsConfig(port=free_port()))

    @first.handles(OrderPlaced)
    async def a(event: OrderPlaced) -> None: ...

    @second.handles(InvoiceIssued)
    async def b(event: InvoiceIssued) -> None: ...

    async with first.running(), second.running():
        result = await first.publish("order-1", [OrderPlaced(order_id="1", amount=1)])
        assert await first.wait_for(result.position) and await second.wait_for(result.position)
        one, two = await scrape(first), await scrape(second)
    assert one.has("tidings_group_handled_total", group="first.a")
    assert not one.has("tidings_group_handled_total", group="second.b")
    assert "second" not in {dict(labels).get("service") for _, labels in one.samples}
    assert two("tidings_group_handled_total", group="second.b") == 0
    assert one("tidings_group_handled_total", group="first.a") == 1


# -- projections and sagas (SQL stores) -------------------------------------------------------------------


class Totals(Projection):
    name = "totals"
    tables = {"totals": "CREATE TABLE {totals} (order_id TEXT PRIMARY KEY, amount INTEGER NOT NULL)"}

    def placed(self, event: OrderPlaced, tx: ProjectionTx) -> None:
        tx.execute("INSERT INTO {totals} (order_id, amount) VALUES (?, ?)", (event.order_id, event.amount))


class ReserveStock(Command):
    __event_type__ = "tests.metrics.ReserveStock"
    order_id: str


class StockReserved(Event):
    __event_type__ = "tests.metrics.StockReserved"
    order_id: str


class OutOfStock(Event):
    __event_type__ = "tests.metrics.OutOfStock"
    order_id: str


class Reserve(Saga):
    name = "reserve"
    started_by = OrderPlaced
    steps = (
        Step(
            "reserve",
            to="inventory",
            command=lambda d: ReserveStock(order_id=d["order_id"]),
            success=StockReserved,
            failure=OutOfStock,
        ),
    )

    def start(self, event: Event) -> tuple[str, Mapping[str, Any]]:
        assert isinstance(event, OrderPlaced)
        return event.order_id, {"order_id": event.order_id, "amount": event.amount}


@pytest.mark.needs("sql")
async def test_projection_and_saga_states(store: EventStore) -> None:
    orders = Service("orders", store, config=FAST, metrics=MetricsConfig(port=free_port()))
    orders.add_projection(Totals())
    orders.add_saga(Reserve(), clock=ManualClock())
    inventory = Service("inventory", store, config=FAST)

    @inventory.handles_command(ReserveStock)
    async def reserve(command: ReserveStock, ctx: HandlerContext) -> None:
        if command.order_id == "waiting":
            return  # no answer: the saga stays running
        outcome = OutOfStock if command.order_id.startswith("none") else StockReserved
        ctx.emit(f"stock-{command.order_id}", [outcome(order_id=command.order_id)])

    async with orders.running(), inventory.running():
        for order_id in ("a", "b", "none-1", "waiting"):
            await orders.publish(f"order-{order_id}", [OrderPlaced(order_id=order_id, amount=5)])

        def states(s: Scrape) -> dict[str, float]:
            return {
                state: s("tidings_sagas", saga="reserve", state=state)
                for state in ("running", "compensating", "completed", "compensated", "failed")
            }

        # Out of stock at the first step: nothing to undo, so the saga ends compensated.
        expected = {"running": 1, "compensating": 0, "completed": 2, "compensated": 1, "failed": 0}
        await wait_until(
            lambda: _scrape_if(orders, lambda s: states(s) == expected),
            what=f"saga states {expected}",
        )
        group = "projection:totals:g1"
        s = await wait_until(
            lambda: _scrape_if(orders, lambda s: s("tidings_group_lag", group=group) == 0),
            what="the projection at the head",
        )
        assert s("tidings_group_handled_total", group=group) == 4
        assert s("tidings_group_alive", group=group) == 1
        assert s("tidings_group_state", group=group, state="live") == 1
        assert s("tidings_group_handled_total", group="saga:reserve") >= 4


# -- serving ----------------------------------------------------------------------------------------------


async def test_paths_methods_and_head(store: EventStore) -> None:
    service = Service("web", store, config=FAST, metrics=MetricsConfig(port=free_port()))
    async with service.running():
        url = service.metrics_url
        assert url is not None
        status, _, body = await asyncio.to_thread(request, url, "GET", "/other")
        assert status == 404 and "/metrics" in body
        status, headers, _ = await asyncio.to_thread(request, url, "POST")
        assert status == 405 and headers["Allow"] == "GET, HEAD"
        status, headers, body = await asyncio.to_thread(request, url, "HEAD")
        assert status == 200 and int(headers["Content-Length"]) > 0 and body == ""
        # Garbage and a client that goes away do not take the endpoint down.
        reader, writer = await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0]))
        writer.write(b"NONSENSE\r\n\r\n")
        await writer.drain()
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
        writer.close()
        assert (await scrape(service))("tidings_head_position") == 0


async def test_render_without_the_server(store: EventStore) -> None:
    """ServiceMetrics renders the page for an HTTP server of one's own."""
    service = Service("embedded", store, config=FAST)

    @service.handles(OrderPlaced)
    async def seen(event: OrderPlaced) -> None: ...

    async with service.running():
        result = await service.publish("order-1", [OrderPlaced(order_id="1", amount=1)])
        assert await service.wait_for(result.position)
        metrics = ServiceMetrics(service)
        s = Scrape((await metrics.render()).decode(), "embedded")
        assert metrics.content_type.startswith("text/plain")
    assert s("tidings_group_handled_total", group="embedded.seen") == 1
    assert s("tidings_appended_events_total") == 1


async def test_a_port_in_use_fails_the_start_and_starts_nothing(store: EventStore) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        service = Service("busy", store, config=FAST, metrics=MetricsConfig(port=port))
        calls: list[str] = []

        @service.handles(OrderPlaced)
        async def h(event: OrderPlaced) -> None:
            calls.append(event.order_id)

        await store.append("order-1", [OrderPlaced(order_id="1", amount=1)])
        with pytest.raises(MetricsError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}"):
            await service.run()
    assert calls == []
    assert await store.checkpoints() == {}  # no runner ever started
    assert service.metrics_url is None


@pytest.mark.parametrize("port", [-1, 65536, "9100", True, 1.5])
def test_bad_ports_are_refused(port: Any) -> None:
    with pytest.raises(InvalidArgument, match="metrics port"):
        MetricsConfig(port=port)


def test_bad_hosts_and_configs_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="metrics host"):
        MetricsConfig(port=9100, host="")
    with pytest.raises(InvalidArgument, match="MetricsConfig"):
        Service("x", "memory://", metrics=9100)  # type: ignore[arg-type]


async def test_an_unknown_host_fails_the_start(store: EventStore) -> None:
    service = Service("nowhere", store, metrics=MetricsConfig(port=free_port(), host="no-such-host.invalid"))
    with pytest.raises(MetricsError, match=r"no-such-host\.invalid"):
        await service.run()


def test_without_the_extra_asking_for_metrics_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    service = Service("plain", "memory://")  # nothing else needs it
    with pytest.raises(MissingExtra, match=r"pip install 'tidings\[metrics\]'"):
        service.use_metrics(MetricsConfig(port=9100))
    with pytest.raises(MissingExtra, match=r"pip install 'tidings\[metrics\]'"):
        Service("plain", "memory://", metrics=MetricsConfig(port=9100))


@pytest.mark.postgres
async def test_a_scrape_while_postgresql_is_down_answers_503_and_recovers() -> None:
    """With the database stopped a scrape answers 503 promptly -- well within Prometheus's
    10 s scrape timeout, not after the connection pool's 30 s wait -- and the service goes on:
    once the database is back, scrapes answer 200 and events are handled again."""
    from tidings.testing.servers import start_postgres

    server = await asyncio.to_thread(start_postgres, durable=True)
    try:
        service = Service("outage", server.url, config=FAST, metrics=MetricsConfig(port=free_port()))
        seen: list[str] = []

        @service.handles(OrderPlaced)
        async def count(event: OrderPlaced) -> None:
            seen.append(event.order_id)

        async with service.running():
            url = service.metrics_url
            assert url is not None
            await service.publish("order-1", [OrderPlaced(order_id="1", amount=1)])
            await wait_until(lambda: seen == ["1"])
            await asyncio.to_thread(server.stop)
            status, _, body = await asyncio.to_thread(request_slowly, url)
            assert status == 503 and "cannot read the metrics" in body, body
            await asyncio.to_thread(server.start)

            async def answers() -> bool:
                return (await asyncio.to_thread(request_slowly, url))[0] == 200

            for _ in range(60):
                if await answers():
                    break
            else:
                raise AssertionError("the endpoint did not recover")
            await service.publish("order-2", [OrderPlaced(order_id="2", amount=2)])
            await wait_until(lambda: seen == ["1", "2"], timeout=60)
    finally:
        await asyncio.to_thread(server.close)


def request_slowly(url: str) -> tuple[int, dict[str, str], str]:
    """:func:`request` with a client timeout below the pool's 30 s wait for a connection: a
    scrape that waits that long times out here."""
    parts = urlsplit(url)
    assert parts.hostname is not None
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=20)
    try:
        connection.request("GET", parts.path)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()
