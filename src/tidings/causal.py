"""The causal trace of a business transaction: every event it caused, in every service, as a tree.

A business transaction is a *conversation*: the event that starts it (a command appended by a
user, an ``OrderPlaced``) carries no correlation id, and everything it causes -- handlers' emits,
saga steps, integration events relayed over the bus and what other services do with them --
carries its id as ``correlation_id`` and the id of its direct cause as ``causation_id``. Services
that each own a store are joined by those ids: an event crossing the bus keeps them.

:func:`build_trace` gathers a conversation from several stores at once (one per service, labelled)
and links the events by causation into a :class:`CausalTrace`::

    trace = await build_trace({"orders": orders_store, "billing": billing_store}, "order-17")
    for node in trace.nodes():
        print(node.service, node.event_type, node.caused_by, node.since_parent_ms)

Reads go through :meth:`~tidings.EventStore.read_correlated_stored`, an indexed read on SQLite
and PostgreSQL: a trace costs a few index probes per store, whatever the size of the log. Events
are read as stored (envelope and metadata only), so a trace also shows the events that no longer
decode -- often the very ones being investigated.

An integration event that a service *translated* from a domain event is published, not stored: its
id is derived from the domain event's (:func:`~tidings.bus.relay.translated_id`). Events a consumer
emitted in response name it as their cause, so the trace links them to the domain event it was
translated from, and a consumer's dead letter of it shows on that domain event.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Final

import orjson

from tidings.bus.relay import translated_id
from tidings.errors import InvalidArgument, TidingsError
from tidings.store.append import validate_stream_id
from tidings.store.base import MAX_CORRELATION_IDS, PAGE_SIZE, EventStore, StoredEvent, stored_event
from tidings.store.tracking import TrackingStore

__all__ = [
    "COMPENSATION_EVENT_TYPES",
    "CausalTrace",
    "DeadLetterInfo",
    "TraceNode",
    "TraceNotFound",
    "build_trace",
]

COMPENSATION_EVENT_TYPES: Final = frozenset(
    {
        "tidings.saga.CompensationStarted",
        "tidings.saga.CompensationDone",
        "tidings.saga.SagaCompensated",
    }
)
"""Saga state events that are compensation steps (flagged in a trace without any metadata)."""

MAX_TRACE_EVENTS: Final = 1_000_000
"""The largest ``limit`` :func:`build_trace` accepts."""


class TraceNotFound(TidingsError):
    """No store holds an event, conversation or stream for the reference given to
    :func:`build_trace`. ``ref`` is that reference, ``sources`` the labels of the stores searched."""

    permanent = True

    def __init__(self, ref: str, sources: Sequence[str]) -> None:
        super().__init__(f"no event id, correlation id or stream {ref!r} in {', '.join(map(repr, sources))}")
        self.ref = ref
        self.sources = tuple(sources)


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """A dead letter of a traced event: the group that gave up on it, its last error, after how
    many attempts, when, and in which store (``service``, the source's label)."""

    group: str
    error: str
    attempts: int
    failed_at: datetime | None = None
    service: str | None = None
    dead_letter_id: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TraceNode:
    """One event of a trace, with the events it caused as ``children``.

    ``service`` is the event's ``service`` metadata (stamped by a running
    :class:`~tidings.Service`) or else the label of the store it was found in. ``caused_by``
    names what emitted it (``handler:<group>.<function>``, ``saga:<saga>.<step>``), when recorded.
    ``since_parent_ms`` is the time from its cause's timestamp to its own (None for a root; across
    machines it is subject to their clocks' skew). ``compensation`` is true for a saga's
    compensation steps, the compensating commands it sends and the replies to them.
    """

    event_id: str
    event_type: str
    stream_id: str
    version: int
    position: int
    timestamp: datetime
    service: str
    correlation_id: str | None
    causation_id: str | None
    caused_by: str | None
    since_parent_ms: float | None
    dead_lettered: tuple[DeadLetterInfo, ...]
    compensation: bool
    children: tuple[TraceNode, ...]
    source: str = ""
    """The label of the store the event was found in."""
    saga_id: str | None = None
    """The saga instance the event belongs to (``saga_id`` metadata), if any."""

    def to_dict(self, parent: str | None = None) -> dict[str, Any]:
        """This node alone (its children by id), in the schema of :meth:`CausalTrace.to_dict`."""
        return {
            "event_id": self.event_id,
            "event_type": self.event_type,
            "stream_id": self.stream_id,
            "version": self.version,
            "position": self.position,
            "timestamp": self.timestamp.isoformat(),
            "service": self.service,
            "source": self.source,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "caused_by": self.caused_by,
            "saga_id": self.saga_id,
            "since_parent_ms": self.since_parent_ms,
            "compensation": self.compensation,
            "dead_lettered": [
                {
                    "group": d.group,
                    "error": d.error,
                    "attempts": d.attempts,
                    "failed_at": None if d.failed_at is None else d.failed_at.isoformat(),
                    "service": d.service,
                    "dead_letter_id": d.dead_letter_id,
                }
                for d in self.dead_lettered
            ],
            "parent": parent,
            "children": [child.event_id for child in self.children],
        }


@dataclasses.dataclass(frozen=True, slots=True)
class CausalTrace:
    """The events of one or more conversations, linked by causation into a forest.

    ``roots`` are the events whose cause is not in the trace (the conversation's first event, or
    an event whose cause was not found in any source), oldest first; children are ordered by
    timestamp. ``correlation_ids`` are the conversations ``ref`` resolved to. ``truncated`` is
    true when the trace stopped at its ``limit`` of events.
    """

    ref: str
    correlation_ids: tuple[str, ...]
    roots: tuple[TraceNode, ...]
    truncated: bool = False
    sources: tuple[str, ...] = ()
    """The labels of the stores searched."""

    def nodes(self) -> Iterator[TraceNode]:
        """Every node, depth-first (a node before its children, children in order)."""
        stack = list(reversed(self.roots))
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def walk(self) -> Iterator[tuple[TraceNode, TraceNode | None, int]]:
        """Every node depth-first with its parent (None for a root) and depth (0 for a root)."""
        stack: list[tuple[TraceNode, TraceNode | None, int]] = [(r, None, 0) for r in reversed(self.roots)]
        while stack:
            node, parent, depth = stack.pop()
            yield node, parent, depth
            stack.extend((child, node, depth + 1) for child in reversed(node.children))

    def __len__(self) -> int:
        return sum(1 for _ in self.nodes())

    @property
    def services(self) -> tuple[str, ...]:
        """The services the trace spans, in order of first appearance (depth-first)."""
        return tuple(dict.fromkeys(node.service for node in self.nodes()))

    def to_dict(self) -> dict[str, Any]:
        """The trace as JSON-ready data (``orjson.dumps`` takes it as is). Stable schema::

            {"ref": str, "correlation_ids": [str], "sources": [str], "truncated": bool,
             "count": int, "services": [str], "roots": [event id],
             "nodes": [{"event_id", "event_type", "stream_id", "version", "position",
                        "timestamp" (ISO 8601, UTC), "service", "source", "correlation_id",
                        "causation_id", "caused_by", "saga_id", "since_parent_ms",
                        "compensation", "dead_lettered": [{"group", "error", "attempts",
                        "failed_at", "service", "dead_letter_id"}],
                        "parent" (event id or null), "children": [event id], "depth": int}]}

        ``nodes`` is flat and depth-first (a node before its children), so a tree of any depth
        serialises (JSON libraries limit nesting); rebuild the tree from ``parent``/``children``.
        """
        nodes = []
        for node, parent, depth in self.walk():
            item = node.to_dict(None if parent is None else parent.event_id)
            item["depth"] = depth
            nodes.append(item)
        return {
            "ref": self.ref,
            "correlation_ids": list(self.correlation_ids),
            "sources": list(self.sources),
            "truncated": self.truncated,
            "count": len(nodes),
            "services": list(self.services),
            "roots": [root.event_id for root in self.roots],
            "nodes": nodes,
        }


@dataclasses.dataclass(slots=True)
class _Found:
    """An event as read, before the tree is built."""

    stored: StoredEvent
    source: str
    order: int
    metadata: Mapping[str, Any]
    parent: str | None = None
    children: list[str] = dataclasses.field(default_factory=list)
    dead_letters: list[DeadLetterInfo] = dataclasses.field(default_factory=list)

    @property
    def event_id(self) -> str:
        return str(self.stored.event_id)

    def text(self, key: str) -> str | None:
        value = self.metadata.get(key)
        return None if value is None else str(value)

    def conversation(self) -> str:
        """The conversation this event belongs to: its correlation id, or its own id."""
        return self.text("correlation_id") or self.event_id


async def build_trace(sources: Mapping[str, EventStore], ref: str, *, limit: int = 10_000) -> CausalTrace:
    """The causal trace of ``ref`` across every store of ``sources`` (label -> opened store).

    ``ref`` is an event id, a correlation id or a stream id (``order-123``). An event id resolves
    to its conversation; a stream id to the conversations of all of its events. Every event of
    those conversations is then gathered from every source and linked by ``causation_id``; the
    dead letters of each source are joined to the events they parked. At most ``limit`` events are
    gathered (the trace says ``truncated`` if there were more).

    Raises :class:`TraceNotFound` if no source knows ``ref``; :class:`~tidings.InvalidArgument`
    for an empty ``sources``, a label that is not a non-empty str, a value that is not an
    :class:`~tidings.EventStore`, a ``ref`` that is not non-empty text, or a ``limit`` < 1.
    Store errors (closed, unavailable) propagate.
    """
    stores = _validate_sources(sources)
    ref = _validate_ref(ref)
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_TRACE_EVENTS:
        raise InvalidArgument(f"limit must be an int from 1 to {MAX_TRACE_EVENTS}, got {limit!r:.40}")

    conversations = await _resolve(stores, ref, limit)
    if not conversations:
        raise TraceNotFound(ref, list(stores))
    found, truncated = await _gather(stores, conversations, limit)
    await _join_dead_letters(stores, found)
    roots = _link(found)
    return CausalTrace(ref, tuple(conversations), roots, truncated, tuple(stores))


def _validate_sources(sources: object) -> dict[str, EventStore]:
    if not isinstance(sources, Mapping):
        raise InvalidArgument(
            f"sources must be a mapping of label to EventStore, got {type(sources).__qualname__}"
        )
    if not sources:
        raise InvalidArgument("sources is empty: give at least one store to trace in")
    out: dict[str, EventStore] = {}
    for label, store in sources.items():
        if not isinstance(label, str) or not label:
            raise InvalidArgument(f"a source's label must be a non-empty str, got {label!r:.60}")
        if not isinstance(store, EventStore):
            raise InvalidArgument(f"source {label!r} is not an EventStore but {type(store).__qualname__}")
        out[label] = store
    return out


def _validate_ref(ref: object) -> str:
    if not isinstance(ref, str):
        raise InvalidArgument(f"ref must be a str (event id, correlation id or stream id), got {ref!r:.60}")
    ref = ref.strip()
    if not ref:
        raise InvalidArgument("ref is empty: give an event id, a correlation id or a stream id")
    # Text the stores can hold: refuses NUL and lone surrogates with a clear message.
    validate_stream_id(ref)
    return ref


def _metadata(stored: StoredEvent) -> Mapping[str, Any]:
    if stored.metadata is None:
        return {}
    try:
        value = orjson.loads(stored.metadata)
    except orjson.JSONDecodeError:
        return {}  # shown without its links rather than not at all
    return value if isinstance(value, dict) else {}


async def _resolve(stores: Mapping[str, EventStore], ref: str, limit: int) -> list[str]:
    """The conversations ``ref`` names: as an event id, a correlation id, else a stream id (those
    of its first ``limit`` events: a trace holds at most that many events anyway)."""
    conversations: dict[str, None] = {}
    normalised = _as_uuid(ref)
    for store in stores.values():
        async for stored in store.read_correlated_stored([ref], limit=PAGE_SIZE):
            meta = _metadata(stored)
            correlation = meta.get("correlation_id")
            if normalised is not None and stored.event_id == normalised:
                conversations[str(correlation) if correlation is not None else str(stored.event_id)] = None
            elif correlation is not None and str(correlation) == ref:
                conversations[ref] = None
    if conversations:
        return list(conversations)
    for store in stores.values():
        after = 0
        while after < limit:
            # Rows as stored: an event that no longer decodes still names its conversation. (The
            # backend primitive: the public readers decode, and stored reads have no stream form.)
            rows = await store._fetch_stream(ref, after, None, False, min(PAGE_SIZE, limit - after))
            for row in rows:
                stored = stored_event(row)
                meta = _metadata(stored)
                correlation = meta.get("correlation_id")
                conversations[str(correlation) if correlation is not None else str(stored.event_id)] = None
            if len(rows) < min(PAGE_SIZE, limit - after):
                break
            after = rows[-1][2]
    return list(conversations)


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def _gather(
    stores: Mapping[str, EventStore], conversations: Sequence[str], limit: int
) -> tuple[dict[str, _Found], bool]:
    found: dict[str, _Found] = {}
    order = 0
    for label, store in stores.items():
        for start in range(0, len(conversations), MAX_CORRELATION_IDS):
            chunk = conversations[start : start + MAX_CORRELATION_IDS]
            async for stored in store.read_correlated_stored(chunk, limit=limit + 1):
                key = str(stored.event_id)
                if key in found:
                    continue  # the same store under two labels: shown once, where first found
                if len(found) == limit:
                    return found, True
                found[key] = _Found(stored, label, order, _metadata(stored))
                order += 1
    return found, False


async def _join_dead_letters(stores: Mapping[str, EventStore], found: Mapping[str, _Found]) -> None:
    # A consumer parks a translated integration event under the translation's id.
    by_id: dict[uuid.UUID, _Found] = {}
    for item in found.values():
        by_id[item.stored.event_id] = item
        by_id.setdefault(translated_id(item.stored.event_id), item)
    for label, store in stores.items():
        if not isinstance(store, TrackingStore):
            continue
        # Only the letters of these events are read (by event id), not every letter of the store.
        for letter in await store.dead_letters_of(list(by_id)):
            parked = by_id.get(letter.event_id)
            if parked is not None:
                parked.dead_letters.append(
                    DeadLetterInfo(
                        letter.group, letter.error, letter.attempts, letter.failed_at, label, letter.id
                    )
                )


def _link(found: dict[str, _Found]) -> tuple[TraceNode, ...]:
    translated = {str(translated_id(item.stored.event_id)): key for key, item in found.items()}
    for key, item in found.items():
        cause = item.text("causation_id")
        if cause is None or cause == key:
            continue
        parent = cause if cause in found else translated.get(cause)
        if parent is not None and parent != key:
            item.parent = parent
    _cut_cycles(found)
    for key, item in found.items():
        if item.parent is not None:
            found[item.parent].children.append(key)

    def when(key: str) -> tuple[datetime, int, int]:
        item = found[key]
        return (item.stored.timestamp, item.order, item.stored.position)

    # Built bottom-up without recursion: a long chain of causes must not hit the recursion limit.
    built: dict[str, TraceNode] = {}
    roots = sorted((key for key, item in found.items() if item.parent is None), key=when)
    stack: list[tuple[str, bool]] = [(key, False) for key in roots]
    while stack:
        key, expanded = stack.pop()
        item = found[key]
        if not expanded:
            stack.append((key, True))
            stack.extend((child, False) for child in item.children)
            continue
        item.children.sort(key=when)
        built[key] = _node(item, found, tuple(built[child] for child in item.children))
    return tuple(built[key] for key in roots)


def _cut_cycles(found: Mapping[str, _Found]) -> None:
    """Cut one link of every loop of causes (hand-written metadata could make one): the link of
    the loop's last-read event, which then becomes a root.

    Each event has at most one parent, so every walk up from an event either ends at a root, joins
    a path already checked, or comes back to itself: marking the events as they are checked makes
    this one pass over the trace, however deep its chains."""
    done: set[str] = set()
    for start in found:
        path: dict[str, None] = {}  # the current walk up, in order (a dict: ordered, O(1) lookup)
        key: str | None = start
        while key is not None and key not in done and key not in path:
            path[key] = None
            key = found[key].parent
        if key is not None and key in path:
            loop = list(path)[list(path).index(key) :]
            found[max(loop, key=lambda k: found[k].order)].parent = None
        done.update(path)


def _node(item: _Found, found: Mapping[str, _Found], children: tuple[TraceNode, ...]) -> TraceNode:
    stored = item.stored
    since = None
    if item.parent is not None:
        since = (stored.timestamp - found[item.parent].stored.timestamp).total_seconds() * 1000
    compensation = stored.event_type in COMPENSATION_EVENT_TYPES or item.metadata.get("compensation") is True
    return TraceNode(
        event_id=item.event_id,
        event_type=stored.event_type,
        stream_id=stored.stream_id,
        version=stored.version,
        position=stored.position,
        timestamp=stored.timestamp,
        service=item.text("service") or item.source,
        correlation_id=item.text("correlation_id"),
        causation_id=item.text("causation_id"),
        caused_by=item.text("caused_by"),
        since_parent_ms=since,
        dead_lettered=tuple(item.dead_letters),
        compensation=compensation,
        children=children,
        source=item.source,
        saga_id=item.text("saga_id"),
    )
