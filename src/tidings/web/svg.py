"""A causal trace drawn as a sequence diagram, in server-side SVG (no script, no fonts to fetch).

One vertical *lane* per service, in the order the services first act; one *row* per event, in
time order (timestamps, then position: positions of different stores are not comparable). An
event is a dot on its service's lane; the arrow into it comes from its cause's lane, labelled
with the event's type and the time since its cause. An event its own service caused is drawn as a
self-arrow on the right of the lane. Dead-lettered events are red, compensations orange and
dashed. Every dot and label links to the event's page.

The drawing takes any tree of nodes with the attributes of :class:`DiagramNode`
(:class:`tidings.causal.TraceNode` has them) and is deterministic: the same trace gives the same
bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from html import escape
from typing import Protocol

__all__ = ["DiagramNode", "sequence_svg"]

LANE = 190
"""Horizontal distance between two lanes."""
ROW = 38
"""Vertical distance between two events."""
TOP = 64
"""Height of the lane headers."""
MARGIN = 24
LABEL_CHARS = 30
LABEL_ROOM = 260
"""Room right of the last lane for the labels of its events."""
LOOP = 16
"""Width of a self-arrow (an event its own service caused) per level of the tree."""
MAX_LOOP = LOOP * 8
"""The widest self-arrow: deeper levels share it (a long chain must not draw off the page)."""


class DiagramNode(Protocol):
    """What the diagram reads of a trace node."""

    @property
    def event_id(self) -> str: ...
    @property
    def event_type(self) -> str: ...
    @property
    def stream_id(self) -> str: ...
    @property
    def position(self) -> int: ...
    @property
    def timestamp(self) -> datetime: ...
    @property
    def service(self) -> str: ...
    @property
    def since_parent_ms(self) -> float | None: ...
    @property
    def dead_lettered(self) -> Sequence[object]: ...
    @property
    def compensation(self) -> bool: ...
    @property
    def children(self) -> Sequence[DiagramNode]: ...


def _walk(roots: Sequence[DiagramNode]) -> Iterable[tuple[DiagramNode, DiagramNode | None, int]]:
    """Every node depth-first with its parent and depth, with an explicit stack: a chain of
    causes deeper than the interpreter's recursion limit must still draw."""
    stack: list[tuple[DiagramNode, DiagramNode | None, int]] = [(r, None, 0) for r in reversed(roots)]
    while stack:
        node, parent, depth = stack.pop()
        yield node, parent, depth
        stack.extend((child, node, depth + 1) for child in reversed(node.children))


def _loop(depth: int) -> int:
    """The width of a self-arrow at ``depth``: steps right with the depth, up to ``MAX_LOOP``."""
    return min(LOOP * depth, MAX_LOOP)


def _short(event_type: str) -> str:
    name = event_type.rsplit(".", 1)[-1]
    return name if len(name) <= LABEL_CHARS else name[: LABEL_CHARS - 1] + "…"


def _since(ms: float | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f" +{ms:.0f} ms"
    return f" +{ms / 1000:.1f} s"


def sequence_svg(
    roots: Sequence[DiagramNode],
    *,
    link: Callable[[DiagramNode], str | None] = lambda node: None,
    title: str = "causal trace",
) -> str:
    """The SVG document (a string) of the trace whose roots are ``roots``; ``link`` gives each
    node's URL (None: not a link). An empty trace gives a small diagram saying so."""
    pairs = sorted(_walk(roots), key=lambda p: (p[0].timestamp, p[0].position, p[0].event_id))
    lanes: list[str] = []
    for node, _, _ in pairs:
        if node.service not in lanes:
            lanes.append(node.service)
    x_of = {service: MARGIN + LANE // 2 + i * LANE for i, service in enumerate(lanes)}
    # Labels of events on their own lane start right of the lane's widest self-arrow.
    widest = dict.fromkeys(lanes, 0)
    for node, parent, depth in pairs:
        if parent is not None and parent.service == node.service:
            widest[node.service] = max(widest[node.service], _loop(depth))
    width = max(1, len(lanes)) * LANE + 2 * MARGIN + LABEL_ROOM + max(widest.values(), default=0)
    height = TOP + max(1, len(pairs)) * ROW + 2 * MARGIN
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="sequence" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
        "<defs>"
        '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="context-stroke"/></marker>'
        "</defs>",
        "<style>"
        ".lane-head{fill:#eef2f7;stroke:#8a9bb0}.lane-name{font:600 13px sans-serif;fill:#1d2a3a}"
        ".lifeline{stroke:#b5c0cd;stroke-dasharray:4 4}.msg{stroke:#3b6ea5;stroke-width:1.5;fill:none}"
        ".dot{fill:#3b6ea5}.label{font:12px sans-serif;fill:#1d2a3a}.since{fill:#6b7785}"
        ".dead .msg,.dead.msg{stroke:#c0392b}.dead .dot{fill:#c0392b}.dead .label{fill:#c0392b}"
        ".comp .msg{stroke:#d68910;stroke-dasharray:6 3}.comp .dot{fill:#d68910}"
        "a:hover .label{text-decoration:underline}"
        "</style>",
    ]
    bottom = height - MARGIN
    for service in lanes:
        x = x_of[service]
        out.append(
            f'<g class="lane" data-service="{escape(service)}">'
            f'<rect class="lane-head" x="{x - LANE // 2 + 8}" y="{MARGIN}" width="{LANE - 16}" '
            f'height="30" rx="5"/>'
            f'<text class="lane-name" x="{x}" y="{MARGIN + 20}" text-anchor="middle">{escape(service)}</text>'
            f'<line class="lifeline" x1="{x}" y1="{MARGIN + 30}" x2="{x}" y2="{bottom}"/></g>'
        )
    if not pairs:
        out.append(f'<text class="label" x="{MARGIN}" y="{TOP + MARGIN}">no events in this trace</text>')
    row_of: dict[str, int] = {}
    for row, (node, parent, depth) in enumerate(pairs):
        row_of[node.event_id] = row
        x = x_of[node.service]
        y = TOP + MARGIN + row * ROW + ROW // 2
        classes = ["event"]
        if node.dead_lettered:
            classes.append("dead")
        if node.compensation:
            classes.append("comp")
        label = escape(_short(node.event_type))
        since = escape(_since(node.since_parent_ms))
        parts = [
            f'<g class="{" ".join(classes)}" data-event-id="{escape(node.event_id)}" '
            f'data-service="{escape(node.service)}">',
            f"<title>{escape(node.event_type)} in {escape(node.stream_id)} ({escape(node.service)})"
            f"{' — dead-lettered' if node.dead_lettered else ''}</title>",
        ]
        if parent is not None and parent.event_id in row_of:
            px = x_of[parent.service]
            py = TOP + MARGIN + row_of[parent.event_id] * ROW + ROW // 2
            if px == x:
                # Nested self-arrows step right with the depth, so that siblings share a line
                # and a deeper branch stands apart from its parent's.
                loop = _loop(depth)
                parts.append(
                    f'<path class="msg" d="M{x},{py} H{x + loop} V{y} H{x + 5}" marker-end="url(#arrow)"/>'
                )
                tx, anchor = x + widest[node.service] + 6, "start"
            else:
                end = x - 5 if px < x else x + 5
                parts.append(f'<path class="msg" d="M{px},{y} H{end}" marker-end="url(#arrow)"/>')
                tx, anchor = (px + x) // 2, "middle"
            ty = y - 6
        else:
            tx, anchor, ty = x + max(10, widest[node.service] + 6), "start", y - 6
        parts.append(f'<circle class="dot" cx="{x}" cy="{y}" r="5"/>')
        text = (
            f'<text class="label" x="{tx}" y="{ty}" text-anchor="{anchor}">{label}'
            f'<tspan class="since">{since}</tspan>{" ✗" if node.dead_lettered else ""}</text>'
        )
        href = link(node)
        parts.append(text if href is None else f'<a href="{escape(href)}">{text}</a>')
        parts.append("</g>")
        out.append("".join(parts))
    out.append("</svg>")
    return "\n".join(out)
