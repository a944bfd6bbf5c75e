"""The reading commands' conversations with the store.

Each function opens the store with :func:`~tidings.cli.runtime.open_existing`, hands every item
to ``emit`` as soon as it is read (so output starts at once and memory stays flat) and closes the
store before returning, also when cancelled. Events are read with ``raw_unknown=True``: a type
with no registered class arrives as a :class:`~tidings.RawEvent` instead of failing the command.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from tidings.cli.runtime import open_existing
from tidings.events import RecordedEvent
from tidings.store import EventStore, StreamInfo

__all__ = [
    "EventQuery",
    "EventSink",
    "TypeCheck",
    "check_types",
    "each_event",
    "each_stream",
    "follow_events",
]

EventSink = Callable[[RecordedEvent], None]
"""Receives each event as it is read (renders it, usually)."""

FOLLOW_WAKE_SECONDS = 1.0
"""Longest wait between two looks at the log when following (appends wake the reader sooner)."""


@dataclasses.dataclass(frozen=True, slots=True)
class EventQuery:
    """Which events to print.

    ``stream`` None means the global log, where ``after`` is a position; for one stream ``after``
    is a version. ``types`` keeps only events of those type names (None keeps all).
    """

    stream: str | None = None
    after: int = 0
    types: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class TypeCheck:
    """Which of the asked-for type names no registered class has and no stored event carries,
    and the names that do exist (registered or stored), sorted."""

    unknown: tuple[str, ...]
    known: tuple[str, ...]


async def check_types(url: str, types: tuple[str, ...]) -> TypeCheck:
    """Look ``types`` up in the store's registry and, if some are not registered, in the log.

    Reading the whole log is the price of naming the stored types; it is only paid when a
    filter names a type no class registers (usually after a filter matched nothing).
    """
    async with open_existing(url) as store:
        registered = set(store.registry.types())
        if all(name in registered for name in types):
            return TypeCheck((), tuple(sorted(registered)))
        stored: set[str] = set()
        async for recorded in store.read_all(raw_unknown=True):
            stored.add(recorded.event_type)
    known = registered | stored
    return TypeCheck(tuple(name for name in types if name not in known), tuple(sorted(known)))


async def each_stream(url: str, prefix: str | None, emit: Callable[[StreamInfo], None]) -> None:
    """Emit every stream of the store (those whose id starts with ``prefix``), ordered by id."""
    async with open_existing(url) as store:
        async for info in store.streams(prefix=prefix):
            emit(info)


async def each_event(url: str, query: EventQuery, emit: EventSink) -> None:
    """Emit the events ``query`` selects, in version order (a stream) or position order (the log)."""
    async with open_existing(url) as store:
        if query.stream is None:
            await _emit_log(store, query.after, query.types, emit)
            return
        async for recorded in store.read_stream(query.stream, after=query.after, raw_unknown=True):
            if query.types is None or recorded.event_type in query.types:
                emit(recorded)


async def follow_events(url: str, after: int, types: tuple[str, ...] | None, emit: EventSink) -> None:
    """Emit the global log after position ``after`` (only ``types``, if given), then each new event
    once committed; never returns.

    Stops only when cancelled (Ctrl-C under ``asyncio.run``). New events are noticed through
    :meth:`~tidings.EventStore.wait_for_append`, so appends by this or other processes wake it
    without polling the log.
    """
    async with open_existing(url) as store:
        cursor = after
        head = await store.head()
        while True:
            cursor = max(cursor, await _emit_log(store, cursor, types, emit))
            # Every event up to `head` was committed before this read began, so the read has seen
            # it; waiting from there (not from the last *matching* event) keeps a type filter from
            # waking the loop again for events it has already skipped.
            cursor = max(cursor, head)
            head = await store.wait_for_append(cursor, timeout=FOLLOW_WAKE_SECONDS)


async def _emit_log(
    store: EventStore,
    after: int,
    types: tuple[str, ...] | None,
    emit: EventSink,
) -> int:
    """Emit the log after ``after``; return the position of the last event emitted (or ``after``)."""
    last = after
    async for recorded in store.read_all(after=after, event_types=types, raw_unknown=True):
        emit(recorded)
        last = recorded.position
    return last
