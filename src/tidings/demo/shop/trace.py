"""The causal trace of one order across every service's store, as a tree.

Every event a handler writes carries ``causation_id`` (the event it handled) and ``correlation_id``
(the event that began the conversation). An order's trace is every event, in any service's
store, that belongs to it: correlated with its ``OrderPlaced``, or in one of its streams (its saga,
the commands the saga sent, its payment, its shipment) -- the saga's deadline starts a conversation
of its own, so correlation alone would miss what a timeout caused. The tree hangs each event under
its cause. An integration event translated by a relay is not stored anywhere: its id is
:func:`~tidings.bus.relay.translated_id` of the domain event's, which is how a consumer's event
that it caused finds its way back to the domain event.
"""

from __future__ import annotations

import dataclasses
import uuid

from rich.markup import escape
from rich.tree import Tree

from tidings.bus.relay import translated_id
from tidings.events import RecordedEvent
from tidings.sagas.state import DeadlinePassed
from tidings.store.base import EventStore

__all__ = ["TraceNode", "order_trace", "render_trace"]

TRANSLATIONS = {
    "shop.orders.OrderPlaced": "shop.OrderSubmitted",
    "shop.orders.OrderCompleted": "shop.OrderConfirmed",
    "shop.orders.OrderCancelled": "shop.OrderRejected",
    "shop.customers.CustomerMoved": "shop.CustomerAddressChanged",
}
"""What the relays publish for the domain events they translate (see the services' translators)."""


@dataclasses.dataclass
class TraceNode:
    event_id: str
    service: str
    event_type: str
    stream_id: str
    detail: str
    cause: str | None
    at: float
    children: list[TraceNode] = dataclasses.field(default_factory=list)

    def count(self) -> int:
        return 1 + sum(child.count() for child in self.children)

    def services(self) -> set[str]:
        out = {self.service}
        for child in self.children:
            out |= child.services()
        return out


def _node(service: str, recorded: RecordedEvent) -> TraceNode:
    event = recorded.event
    data = event.model_dump() if hasattr(event, "model_dump") else {}
    shown = {k: v for k, v in data.items() if k in ("sku", "quantity", "amount", "reason", "step", "status")}
    detail = " ".join(f"{k}={v}" for k, v in shown.items())
    return TraceNode(
        str(recorded.event_id),
        service,
        recorded.event_type,
        recorded.stream_id,
        detail,
        recorded.causation_id,
        recorded.timestamp.timestamp(),
    )


async def order_trace(stores: dict[str, EventStore], order_id: str) -> list[TraceNode]:
    """The roots of the order's causal tree (normally one: its ``OrderPlaced``)."""
    placed = [r async for r in stores["orders"].read_stream(order_id)]
    if not placed:
        return []
    correlation = placed[0].correlation_id or str(placed[0].event_id)
    nodes: dict[str, TraceNode] = {}
    others: list[TraceNode] = []
    for service, store in stores.items():
        async for recorded in store.read_all():
            event = recorded.event
            mine = (
                recorded.correlation_id == correlation
                or str(recorded.event_id) == correlation
                or recorded.stream_id.endswith(order_id)
                or (isinstance(event, DeadlinePassed) and event.saga_id.endswith(order_id))
            )
            node = _node(service, recorded)
            if mine:
                nodes.setdefault(node.event_id, node)
            else:
                others.append(node)
    # What the order's events caused in other conversations (a release after a deadline).
    grown = True
    while grown:
        grown = False
        for node in others:
            if node.event_id not in nodes and node.cause in nodes:
                nodes[node.event_id] = node
                grown = True
    # The integration events the relays published for translated domain events.
    for node in list(nodes.values()):
        public = TRANSLATIONS.get(node.event_type)
        if public is not None:
            published = str(translated_id(uuid.UUID(node.event_id)))
            nodes[published] = TraceNode(
                published,
                node.service,
                public,
                node.stream_id,
                "(published on the bus)",
                node.event_id,
                node.at,
            )
    roots: list[TraceNode] = []
    for node in sorted(nodes.values(), key=lambda n: n.at):
        parent = nodes.get(node.cause) if node.cause is not None else None
        if parent is None or parent is node:
            roots.append(node)
        else:
            parent.children.append(node)
    return roots


def render_trace(roots: list[TraceNode], title: str) -> Tree:
    tree = Tree(title)

    def add(branch: Tree, node: TraceNode) -> None:
        label = f"[bold]{node.service}[/bold] {escape(node.event_type)} [dim]{escape(node.stream_id)}[/dim]"
        if node.detail:
            label += f" {escape(node.detail)}"
        child = branch.add(label)
        for sub in node.children:
            add(child, sub)

    for root in roots:
        add(tree, root)
    return tree
