"""The causal trace of the reference shop's orders: ``build_trace`` over the six services' stores
(the embedded shop: SQLite files, the in-process bus) gives one tree per order, spanning services."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from rich.console import Console

from tidings import EventStore, build_trace, open_store
from tidings.demo.shop.runner import ShopConfig, run_shop_async
from tidings.demo.shop.wiring import SERVICES


async def test_an_orders_trace_spans_the_services(tmp_path: Path) -> None:
    config = ShopConfig(orders=40, variant="saga", workdir=tmp_path, progress=False)
    report = await run_shop_async(config, Console(file=io.StringIO(), width=120))
    assert report.ok, report.problems()
    [result] = report.results
    compensated = result.trace_order
    assert compensated is not None, "the run had no compensated order to trace"
    seen = result.observation
    confirmed = next(o for o in sorted(seen.statuses) if seen.outcome(o) == "confirmed")
    async with contextlib.AsyncExitStack() as stack:
        stores: dict[str, EventStore] = {}
        for service in SERVICES:
            url = f"sqlite:///{tmp_path / 'saga' / service}.db"
            stores[service] = await stack.enter_async_context(open_store(url))

        trace = await build_trace(stores, confirmed)
        assert len(trace.roots) == 1 and trace.roots[0].stream_id == confirmed
        assert {"orders", "inventory", "payments", "shipping", "email"} <= set(trace.services)
        assert all(node.caused_by for node in trace.nodes() if node is not trace.roots[0])
        assert not any(node.compensation for node in trace.nodes())

        failed = await build_trace(stores, compensated)
        assert {"orders", "inventory", "payments"} <= set(failed.services)
        assert any(node.compensation for node in failed.nodes())
        # Everything the demo's own trace found (it scans every log) is in this one, which reads
        # the correlation index; the demo adds the published integration events, never stored.
        demo_ids = {node.event_id for root in result.trace for node in _walk(root)}
        stored_ids = {node.event_id for node in failed.nodes()}
        assert demo_ids - stored_ids == {
            node.event_id for root in result.trace for node in _walk(root) if "published" in node.detail
        }


def _walk(node: object) -> list[object]:
    out = [node]
    for child in node.children:  # type: ignore[attr-defined]
        out += _walk(child)
    return out
