"""One service of ``tests/bus/apps/relayshop.py`` in its own process, recording its spans.

``python -m tests.bus.trace_worker ROLE STORE BUS OUT``

Installs an OpenTelemetry SDK ``TracerProvider`` that keeps spans in memory, then:

* ``orders``: runs the service ``orders``, publishes one ``OrderPlaced`` (an append) and waits
  until its relay has published it to the bus;
* ``inventory``: prints ``ready`` once its bus consumer has joined, and runs until it has handled
  one message.

On the way out it writes every finished span to ``OUT`` as JSON (name, hex ids, parent, links,
attributes), for the test to compare the two processes' traces.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

sys.path.insert(0, str(Path(__file__).with_name("apps")))

from relayshop import OrderPlaced, inventory, orders


def as_json(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": None if span.parent is None else f"{span.parent.span_id:016x}",
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
        "attributes": dict(span.attributes or {}),
    }


async def run_orders(store: str, bus: str) -> None:
    orders.use_store(store)
    orders.use_bus(bus)
    async with orders.running():
        result = await orders.publish("order-1", [OrderPlaced(sku="sku-1", quantity=2)])
        tracking = await orders.open()
        while (await tracking.checkpoints()).get("orders.relay", 0) < result.position:  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)


async def run_inventory(store: str, bus: str) -> None:
    inventory.use_store(store)
    inventory.use_bus(bus)
    async with inventory.running():
        print("ready", flush=True)
        while sum(s.handled for s in inventory.statistics()) < 1:
            await asyncio.sleep(0.05)


def main() -> None:
    role, store, bus, out = sys.argv[1:5]
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    try:
        asyncio.run(run_orders(store, bus) if role == "orders" else run_inventory(store, bus))
    finally:
        Path(out).write_text(json.dumps([as_json(s) for s in exporter.get_finished_spans()]))
        provider.shutdown()


if __name__ == "__main__":
    main()
