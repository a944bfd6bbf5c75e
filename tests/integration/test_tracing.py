"""OpenTelemetry spans in one process, with the SDK's in-memory exporter: an append, the handlers
it sets off, what they emit, a saga's steps and a projection batch form one trace with the right
parents; with spans disabled the events keep their trace context and no span is recorded."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tidings import (
    Command,
    Event,
    EventStore,
    HandlerContext,
    Projection,
    ProjectionTx,
    RecordedEvent,
    RetryPolicy,
    Saga,
    Service,
    Step,
    SubscriptionConfig,
    open_store,
    tracing,
)
from tidings.tracing import TraceParent

FAST = SubscriptionConfig(
    batch_size=50, poll_interval=0.02, retry=RetryPolicy(max_attempts=2, initial_delay=0.001, max_delay=0.01)
)


class OrderPlaced(Event):
    __event_type__ = "tests.tracing.OrderPlaced"
    order_id: str


class IssueInvoice(Command):
    __event_type__ = "tests.tracing.IssueInvoice"
    order_id: str


class InvoiceIssued(Event):
    __event_type__ = "tests.tracing.InvoiceIssued"
    order_id: str


class Billing(Saga):
    name = "billing"
    started_by = OrderPlaced
    steps = (
        Step(
            "invoice",
            to="accounts",
            command=lambda d: IssueInvoice(order_id=d["order_id"]),
            success=InvoiceIssued,
        ),
    )

    def start(self, event: Event) -> tuple[str, Mapping[str, Any]]:
        assert isinstance(event, OrderPlaced)
        return event.order_id, {"order_id": event.order_id}


class Orders(Projection):
    name = "orders"
    tables = {"orders": "CREATE TABLE {orders} (order_id TEXT PRIMARY KEY)"}

    def placed(self, event: OrderPlaced, tx: ProjectionTx) -> None:
        tx.execute("INSERT INTO {orders} (order_id) VALUES (?)", (event.order_id,))


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.enable(provider)
    try:
        yield memory
    finally:
        tracing.enable()  # back to the global provider
        provider.shutdown()


def services(store: EventStore, log: list[str]) -> list[Service]:
    orders = Service("orders", store, config=FAST)
    orders.add_saga(Billing())
    orders.add_projection(Orders())
    accounts = Service("accounts", store, config=FAST)

    @accounts.handles_command(IssueInvoice)
    async def issue(command: IssueInvoice, ctx: HandlerContext) -> None:
        ctx.emit(f"invoice-{command.order_id}", [InvoiceIssued(order_id=command.order_id)])

    @accounts.handles(InvoiceIssued)
    async def notify(event: InvoiceIssued) -> None:
        log.append(event.order_id)

    return [orders, accounts]


async def run_one_order(store: EventStore) -> tuple[int, list[str]]:
    log: list[str] = []
    orders, accounts = services(store, log)
    async with orders.running(), accounts.running():
        placed = await store.append("order-1", [OrderPlaced(order_id="1")])
        for _ in range(500):
            if log:
                break
            await store.wait_for_append(await store.head(), timeout=0.02)
        assert log == ["1"]
        head = await store.head()
        assert await orders.wait_for(head, timeout=10) and await accounts.wait_for(head, timeout=10)
    return placed.position, log


async def events(store: EventStore) -> dict[str, RecordedEvent]:
    return {
        e.event_type.rsplit(".", 1)[-1]: e
        async for e in store.read_all()
        if e.event_type.startswith("tests.")
    }


def context_of(recorded: RecordedEvent) -> tuple[int, int]:
    parsed = TraceParent.parse(recorded.metadata["traceparent"])
    return parsed.trace_id, parsed.span_id


def ids(span: ReadableSpan) -> tuple[int, int]:
    assert span.context is not None
    return span.context.trace_id, span.context.span_id


def handle_of(spans: list[ReadableSpan], event_type: str, group: str) -> ReadableSpan:
    [span] = [
        s
        for s in spans
        if s.name == "tidings.handle"
        and s.attributes is not None
        and s.attributes["tidings.event_type"] == event_type
        and s.attributes["messaging.consumer.group.name"] == group
    ]
    return span


async def test_one_business_transaction_is_one_trace(tmp_path: Path, exporter: InMemorySpanExporter) -> None:
    async with open_store(f"sqlite:///{tmp_path}/t.db") as store:
        position, _ = await run_one_order(store)
        stored = await events(store)
    spans = list(exporter.get_finished_spans())
    [append] = [
        s
        for s in spans
        if s.name == "tidings.append" and s.attributes["messaging.destination.name"] == "order-1"
    ]  # type: ignore[index]
    assert append.attributes is not None
    assert append.attributes["tidings.position"] == position
    assert append.attributes["messaging.batch.message_count"] == 1
    trace_id = ids(append)[0]
    # The placed event names the append span.
    assert context_of(stored["OrderPlaced"]) == ids(append)

    # The saga handles it as a child of the append; its step is a child of that handle span.
    saga_handle = handle_of(spans, OrderPlaced.__event_type__, "saga:billing")
    assert saga_handle.parent is not None and saga_handle.parent.span_id == ids(append)[1]
    steps = [s for s in spans if s.name == "tidings.saga.step"]
    first_step = next(s for s in steps if s.parent is not None and s.parent.span_id == ids(saga_handle)[1])
    assert first_step.attributes is not None and first_step.attributes["tidings.saga.step"] == "invoice"
    # The command it sends names the step's span; the command's handler is its child ...
    assert context_of(stored["IssueInvoice"]) == ids(first_step)
    issue = handle_of(spans, IssueInvoice.__event_type__, "accounts.issue")
    assert issue.parent is not None and issue.parent.span_id == ids(first_step)[1]
    # ... and what that handler emits names the handler's span, and is handled as its child.
    assert context_of(stored["InvoiceIssued"]) == ids(issue)
    notify = handle_of(spans, InvoiceIssued.__event_type__, "accounts.notify")
    assert notify.parent is not None and notify.parent.span_id == ids(issue)[1]
    reply = handle_of(spans, InvoiceIssued.__event_type__, "saga:billing")
    assert reply.parent is not None and reply.parent.span_id == ids(issue)[1]
    assert {s.attributes["tidings.saga.status"] for s in steps} >= {"completed"}  # type: ignore[index]

    # Every span of the transaction is in one trace.
    chain = [append, saga_handle, first_step, issue, notify, reply]
    assert {ids(s)[0] for s in chain} == {trace_id}
    assert all(s.attributes["tidings.outcome"] == "handled" for s in (saga_handle, issue, notify, reply))  # type: ignore[index]

    # The projection's batch is linked to the event it applied (a batch mixes traces).
    [projection] = [s for s in spans if s.name == "tidings.projection" and s.links]
    assert [
        ids_of_link for ids_of_link in ((lk.context.trace_id, lk.context.span_id) for lk in projection.links)
    ] == [ids(append)]


async def test_failed_handler_span_records_the_error_and_the_attempt(
    tmp_path: Path, exporter: InMemorySpanExporter
) -> None:
    async with open_store(f"sqlite:///{tmp_path}/t.db") as store:
        service = Service("shop", store, config=FAST)

        @service.handles(OrderPlaced)
        async def fails(event: OrderPlaced) -> None:
            raise RuntimeError("no")

        async with service.running():
            placed = await store.append("order-1", [OrderPlaced(order_id="1")])
            assert await service.wait_for(placed.position, timeout=10)
    handles = [s for s in exporter.get_finished_spans() if s.name == "tidings.handle"]
    assert [s.attributes["tidings.attempt"] for s in handles] == [1, 2]  # type: ignore[index]
    assert all(s.attributes["tidings.outcome"] == "error" for s in handles)  # type: ignore[index]
    assert all(not s.status.is_ok and s.events[0].name == "exception" for s in handles)
    # Giving up is a span of the same trace, named for the dead letter.
    [parked] = [s for s in exporter.get_finished_spans() if s.name == "tidings.dead_letter"]
    assert parked.attributes is not None and parked.context is not None
    assert parked.attributes["tidings.outcome"] == "dead_letter" and parked.attributes["tidings.attempt"] == 2
    assert parked.attributes["messaging.consumer.group.name"] == "shop.fails"
    assert {parked.context.trace_id} == {s.context.trace_id for s in handles if s.context is not None}


class NoSpanCode:
    """Stands in for the OpenTelemetry API: any use of it fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"span code ran with spans disabled: opentelemetry.trace.{name}")


async def test_with_spans_disabled_events_still_form_one_trace(
    tmp_path: Path, exporter: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracing.disable()
    monkeypatch.setattr(tracing, "_otel", NoSpanCode())
    async with open_store(f"sqlite:///{tmp_path}/t.db") as store:
        await run_one_order(store)
        stored = await events(store)
    assert exporter.get_finished_spans() == ()
    placed, command, issued = stored["OrderPlaced"], stored["IssueInvoice"], stored["InvoiceIssued"]
    # One trace id through the chain, a new span id at each hop.
    assert len({context_of(e)[0] for e in (placed, command, issued)}) == 1
    assert len({context_of(e)[1] for e in (placed, command, issued)}) == 3
