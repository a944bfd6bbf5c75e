"""The sequence diagram on its own: lanes in order of first appearance, one row per event in time
order, an arrow per cause, classes for dead letters and compensations, text escaped."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

from tidings.web.svg import sequence_svg

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"


@dataclasses.dataclass(frozen=True)
class Node:
    event_id: str
    event_type: str
    service: str
    at: int
    children: tuple[Node, ...] = ()
    dead_lettered: tuple[object, ...] = ()
    compensation: bool = False
    stream_id: str = "s"
    since_parent_ms: float | None = None

    @property
    def position(self) -> int:
        return self.at

    @property
    def timestamp(self) -> datetime:
        return T0 + timedelta(milliseconds=self.at)


def tree() -> Node:
    refund = Node("e4", "shop.RefundIssued", "payments", 4, compensation=True)
    mail = Node("e3", "shop.<script>Mail", "emails", 3, dead_lettered=("parked",))
    paid = Node("e2", "shop.Paid", "payments", 2, children=(refund,), since_parent_ms=1500.0)
    return Node("e1", "shop.OrderPlaced", "orders", 1, children=(paid, mail))


def groups(svg: str, cls: str) -> list[ET.Element]:
    root = ET.fromstring(svg)  # well-formed XML
    return [g for g in root.iter(f"{SVG}g") if cls in (g.get("class") or "").split()]


def test_lanes_rows_and_arrows() -> None:
    svg = sequence_svg([tree()], link=lambda n: f"/events/{n.event_id}")
    assert [g.get("data-service") for g in groups(svg, "lane")] == ["orders", "payments", "emails"]
    events = groups(svg, "event")
    assert [g.get("data-event-id") for g in events] == ["e1", "e2", "e3", "e4"]  # time order
    assert [len(g.findall(f"{SVG}path")) for g in events] == [0, 1, 1, 1]  # the root has no cause
    assert [g.get("data-event-id") for g in groups(svg, "dead")] == ["e3"]
    assert [g.get("data-event-id") for g in groups(svg, "comp")] == ["e4"]
    assert 'href="/events/e2"' in svg and "+1.5 s" in svg
    assert "<script>" not in svg and "&lt;script&gt;Mail" in svg
    assert sequence_svg([tree()]) == sequence_svg([tree()])  # deterministic


def test_an_empty_trace_says_so() -> None:
    svg = sequence_svg([])
    assert groups(svg, "event") == [] and "no events in this trace" in svg


def test_a_chain_deeper_than_the_recursion_limit_draws_within_its_width() -> None:
    depth = 3_000  # the interpreter's recursion limit is 1,000
    node = Node(f"e{depth}", "shop.Step", "orders", depth)
    for at in range(depth - 1, 0, -1):
        node = Node(f"e{at}", "shop.Step", "orders", at, children=(node,))
    svg = sequence_svg([node])
    root = ET.fromstring(svg)
    width = int(root.get("width") or 0)
    assert len(groups(svg, "event")) == depth
    for path in root.iter(f"{SVG}path"):
        d = path.get("d") or ""
        if d.startswith("M") and " H" in d:  # a self-arrow: M x,y H x+loop V y' H x+5
            assert int(d.split(" H")[1].split(" ")[0]) < width
    texts = [float(t.get("x") or 0) for t in root.iter(f"{SVG}text")]
    assert max(texts) < width
