"""The reads the console needs that the store has no method for, built on its public API.

Events are read *as stored* (:meth:`~tidings.EventStore.read_all_stored`,
:meth:`~tidings.EventStore.read_correlated_stored`) and decoded one by one with
:func:`event_out`, so an event that no longer decodes -- often the very one being investigated,
and exactly what a subscription parks as a dead letter -- shows with its raw data and why it does
not decode, instead of failing the whole page.

An event is found by id through the events table's unique index on SQL stores
(:meth:`~tidings.SQLStore.query`), by a scan of the log elsewhere (the memory store). The events
an event caused are found among its conversation's (same correlation id), an indexed read.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from tidings.errors import TidingsError
from tidings.store.base import PAGE_SIZE, EventStore, StoredEvent, stored_event
from tidings.store.sqlite import SQLiteStore
from tidings.store.tracking import SQLStore
from tidings.web.schemas import EventOut, EventRef

__all__ = [
    "CONVERSATION_LIMIT",
    "caused_by",
    "event_at",
    "event_out",
    "find_event",
    "metadata_of",
    "parse_event_id",
    "read_stream_stored",
]

CONVERSATION_LIMIT = 10_000
"""How many events of a conversation are read to find the events one of them caused."""


def parse_event_id(text: str) -> uuid.UUID | None:
    """``text`` as a UUID, or None if it is not one."""
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def metadata_of(stored: StoredEvent) -> dict[str, Any]:
    """The stored event's metadata as a dict; ``{}`` when there is none or it is not a JSON object."""
    if stored.metadata is None:
        return {}
    try:
        value = orjson.loads(stored.metadata)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def event_out(store: EventStore, stored: StoredEvent) -> EventOut:
    """``stored`` decoded as the store's readers would (unknown types raw), or, when it does not
    decode, its raw JSON data with ``undecodable`` saying why ("does not decode: ...")."""
    row = (
        stored.position,
        stored.stream_id,
        stored.version,
        stored.event_id,
        stored.event_type,
        stored.schema_version,
        stored.timestamp,
        stored.data,
        stored.metadata,
    )
    try:
        return EventOut.of(store.decode_rows([row], raw_unknown=True)[0])
    except TidingsError as exc:
        reason = str(exc)
    try:
        data = orjson.loads(stored.data)
    except orjson.JSONDecodeError:
        data = None
    return EventOut(
        **EventRef.envelope(stored).model_dump(),
        schema_version=stored.schema_version,
        timestamp=stored.timestamp,
        data=data if isinstance(data, dict) else {"raw": stored.data.decode(errors="replace")},
        metadata=metadata_of(stored),
        undecodable=f"does not decode: {reason}",
    )


async def read_stream_stored(
    store: EventStore, stream_id: str, *, after: int = 0, backwards: bool = False, limit: int
) -> list[StoredEvent]:
    """At most ``limit`` events of ``stream_id`` as stored, after version ``after`` (forwards) or
    newest first (``backwards``). The stores have no public stored stream read, so this pages
    over the backend primitive, as the causal trace does."""
    out: list[StoredEvent] = []
    lower, upper = after, None
    while len(out) < limit:
        page = min(PAGE_SIZE, limit - len(out))
        rows = await store._fetch_stream(stream_id, lower, upper, backwards, page)
        out.extend(stored_event(row) for row in rows)
        if len(rows) < page:
            break
        if backwards:
            upper = rows[-1][2]
        else:
            lower = rows[-1][2]
    return out


async def event_at(store: EventStore, position: int) -> StoredEvent | None:
    """The event at global ``position`` as stored, or None if there is none."""
    if position < 1:
        return None
    async for stored in store.read_all_stored(after=position - 1, limit=1):
        return stored if stored.position == position else None
    return None


async def find_event(store: EventStore, event_id: uuid.UUID) -> StoredEvent | None:
    """The event with id ``event_id`` as stored, or None if this store has none."""
    if isinstance(store, SQLStore):
        # SQLite keeps the id as its 16 bytes, PostgreSQL as uuid.
        param: object = event_id.bytes if isinstance(store, SQLiteStore) else event_id
        rows = await store.query("SELECT position FROM tidings_events WHERE event_id = ?", [param])
        return None if not rows else await event_at(store, int(rows[0][0]))
    async for stored in store.read_all_stored():
        if stored.event_id == event_id:
            return stored
    return None


async def caused_by(
    store: EventStore, stored: StoredEvent, *, limit: int = CONVERSATION_LIMIT
) -> tuple[list[StoredEvent], bool]:
    """The events whose ``causation_id`` is ``stored``'s id, and whether the search was complete.

    An effect belongs to its cause's conversation, so only that conversation is read (an indexed
    read, :meth:`~tidings.EventStore.read_correlated_stored`: only metadata is needed, so events
    that no longer decode are found too), at most ``limit`` events of it: the answer is
    incomplete when the conversation is longer.
    """
    wanted = str(stored.event_id)
    metadata: Mapping[str, Any] = metadata_of(stored)
    conversation = str(metadata.get("correlation_id") or wanted)
    found: list[StoredEvent] = []
    count = 0
    async for other in store.read_correlated_stored([conversation], limit=limit):
        count += 1
        if str(metadata_of(other).get("causation_id")) == wanted:
            found.append(other)
    return found, count < limit
