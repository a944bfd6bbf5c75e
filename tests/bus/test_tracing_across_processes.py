"""One trace across two processes: service ``orders`` appends and relays an event over a real
NATS server, service ``inventory`` handles it in another process, and each process's spans name
the same trace, the consumer's ``tidings.handle`` span a child of the producer's ``tidings.append``."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any

from tidings.tracing import TraceParent

HERE = Path(__file__).parent


async def worker(role: str, store: str, bus: str, out: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.bus.trace_worker",
        role,
        store,
        bus,
        str(out),
        env=env,
        cwd=HERE.parent.parent,
        stdout=asyncio.subprocess.PIPE,
    )


def spans(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def only(found: list[dict[str, Any]], name: str) -> dict[str, Any]:
    named = [s for s in found if s["name"] == name]
    assert len(named) == 1, f"expected one {name} span, got {found}"
    return named[0]


async def test_consumer_span_in_another_process_is_child_of_producer_append(
    tmp_path: Path, nats_url: str
) -> None:
    inventory = await worker("inventory", f"sqlite:///{tmp_path}/inventory.db", nats_url, tmp_path / "b.json")
    assert inventory.stdout is not None
    assert await asyncio.wait_for(inventory.stdout.readline(), 60) == b"ready\n"
    orders = await worker("orders", f"sqlite:///{tmp_path}/orders.db", nats_url, tmp_path / "a.json")
    assert await asyncio.wait_for(orders.wait(), 60) == 0
    assert await asyncio.wait_for(inventory.wait(), 60) == 0

    a, b = spans(tmp_path / "a.json"), spans(tmp_path / "b.json")
    append = only(a, "tidings.append")
    publish = only(a, "tidings.publish")
    handle = only(b, "tidings.handle")
    assert append["attributes"]["messaging.destination.name"] == "order-1"
    # The relay's publish is linked to the message's creation context, the append.
    assert publish["links"] == [{"trace_id": append["trace_id"], "span_id": append["span_id"]}]
    assert publish["attributes"]["messaging.destination.name"] == "orders"
    # Process B continues process A's trace: its handle span is the child of A's append span.
    assert handle["trace_id"] == append["trace_id"]
    assert handle["parent_span_id"] == append["span_id"]
    assert handle["attributes"]["messaging.consumer.group.name"] == "inventory.reserve"
    assert handle["attributes"]["tidings.source"] == "orders"
    assert handle["attributes"]["tidings.outcome"] == "handled"

    # The stored events carry the same context: A's event names the append span.
    with sqlite3.connect(tmp_path / "orders.db") as db:
        [(metadata,)] = db.execute("SELECT metadata FROM tidings_events").fetchall()
    stored = TraceParent.parse(json.loads(metadata)["traceparent"])
    assert (f"{stored.trace_id:032x}", f"{stored.span_id:016x}") == (append["trace_id"], append["span_id"])
