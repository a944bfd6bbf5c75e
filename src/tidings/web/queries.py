"""The reads the console needs that the store has no method for, built on its public API.

An event is found by id through the events table's unique index on SQL stores
(:meth:`~tidings.SQLStore.query`), by a scan of the log elsewhere (the memory store). The events
an event caused are found among its conversation's (same correlation id), an indexed read.
"""

from __future__ import annotations

import uuid

from tidings.events import RecordedEvent
from tidings.store.base import EventStore
from tidings.store.sqlite import SQLiteStore
from tidings.store.tracking import SQLStore

__all__ = ["CONVERSATION_LIMIT", "caused_by", "event_at", "find_event", "parse_event_id"]

CONVERSATION_LIMIT = 10_000
"""How many events of a conversation are read to find the events one of them caused."""


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
    store: EventStore, recorded: RecordedEvent, *, limit: int = CONVERSATION_LIMIT
) -> tuple[list[RecordedEvent], bool]:
    """The events whose ``causation_id`` is ``recorded``'s id, and whether the search was complete.

    An effect belongs to its cause's conversation, so only that conversation is read (an indexed
    read, :meth:`~tidings.EventStore.read_correlated`), at most ``limit`` events of it: the
    answer is incomplete when the conversation is longer.
    """
    wanted = str(recorded.event_id)
    conversation = str(recorded.metadata.get("correlation_id") or wanted)
    found: list[RecordedEvent] = []
    count = 0
    async for other in store.read_correlated([conversation], limit=limit, raw_unknown=True):
        count += 1
        if str(other.metadata.get("causation_id")) == wanted:
            found.append(other)
    return found, count < limit
