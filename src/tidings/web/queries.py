"""The reads the console needs that the store has no method for, built on its public API.

An event is found by id through the events table's unique index on SQL stores
(:meth:`~tidings.SQLStore.query`), by a scan of the log elsewhere (the memory store). The events
an event caused are found by reading the log after it, bounded: an effect is written after its
cause, and usually soon after.
"""

from __future__ import annotations

import uuid

from tidings.events import RecordedEvent
from tidings.store.base import EventStore
from tidings.store.sqlite import SQLiteStore
from tidings.store.tracking import SQLStore

__all__ = ["CAUSED_SCAN", "caused_by", "event_at", "find_event", "parse_event_id"]

CAUSED_SCAN = 5000
"""How many events after an event are read to find the events it caused."""


def parse_event_id(text: str) -> uuid.UUID | None:
    """``text`` as a UUID, or None if it is not one."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


async def event_at(store: EventStore, position: int) -> RecordedEvent | None:
    """The event at global ``position``, or None if there is none."""
    if position < 1:
        return None
    async for recorded in store.read_all(after=position - 1, limit=1, raw_unknown=True):
        return recorded if recorded.position == position else None
    return None


async def find_event(store: EventStore, event_id: uuid.UUID) -> RecordedEvent | None:
    """The event with id ``event_id``, or None if this store has none."""
    if isinstance(store, SQLStore):
        # SQLite keeps the id as its 16 bytes, PostgreSQL as uuid.
        param: object = event_id.bytes if isinstance(store, SQLiteStore) else event_id
        rows = await store.query("SELECT position FROM tidings_events WHERE event_id = ?", [param])
        return None if not rows else await event_at(store, int(rows[0][0]))
    async for recorded in store.read_all(raw_unknown=True):
        if recorded.event_id == event_id:
            return recorded
    return None


async def caused_by(
    store: EventStore, recorded: RecordedEvent, *, scan: int = CAUSED_SCAN
) -> tuple[list[RecordedEvent], int, bool]:
    """The events whose ``causation_id`` is ``recorded``'s id, read from at most ``scan`` events
    after it; also the position the scan reached and whether it reached the head."""
    wanted = str(recorded.event_id)
    found: list[RecordedEvent] = []
    reached = recorded.position
    count = 0
    async for later in store.read_all(after=recorded.position, limit=scan, raw_unknown=True):
        count += 1
        reached = later.position
        if str(later.metadata.get("causation_id")) == wanted:
            found.append(later)
    complete = count < scan or reached >= await store.head()
    return found, reached, complete
