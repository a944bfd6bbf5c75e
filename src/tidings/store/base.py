"""The event store contract -- streams, the global log, snapshots, change notification -- and the
logic every backend shares.

A backend subclasses :class:`EventStore` (or, with more capabilities, :class:`~tidings.store.tracking.
TrackingStore` or :class:`~tidings.store.tracking.SQLStore`) and implements a handful of primitives
over stored rows (``_append``, ``_fetch_stream``, ``_fetch_all`` ...). Validation, encoding,
decoding and upcasting live here once, and the expected-version / idempotent-append rules in
:mod:`tidings.store.append`, so every backend behaves the same and the contract suite in
:mod:`tidings.testing` can hold them all to it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self, TypeAlias
from urllib.parse import unquote_plus, urlsplit

import orjson
from pydantic import ValidationError

from tidings import tracing
from tidings.errors import (
    CorruptEvent,
    InvalidArgument,
    SerializationError,
    StoreClosed,
)
from tidings.events import (
    Event,
    EventRegistry,
    RawEvent,
    RecordedEvent,
    datetime_from_micros,
    default_registry,
    uuid_from_bytes,
)
from tidings.store.append import (
    ANY,
    AppendRequest,
    AppendResult,
    EncodedEvent,
    ExpectedVersion,
    new_event_ids,
    validate_expected,
    validate_stream_id,
)

__all__ = [
    "MAX_CORRELATION_IDS",
    "EventStore",
    "Row",
    "Snapshot",
    "StoredEvent",
    "StreamInfo",
    "mask_password",
    "now_micros",
    "validate_position",
]

PAGE_SIZE: Final = 1000
"""Rows fetched per round trip by the streaming readers; bounds their memory."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream's id, version (its last event's version) and its last event's position."""

    stream_id: str
    version: int
    position: int


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """A stored copy of an aggregate's state as of ``version`` of its stream."""

    stream_id: str
    version: int
    aggregate_type: str
    schema: str
    state: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event exactly as stored, not decoded: its envelope, type, schema version and JSON bytes
    (see :meth:`EventStore.read_all_stored`)."""

    position: int
    stream_id: str
    version: int
    event_id: uuid.UUID
    event_type: str
    schema_version: int
    timestamp: datetime
    data: bytes
    metadata: bytes | None


Row: TypeAlias = tuple[Any, ...]
"""A stored event: (position, stream_id, version, event_id, event_type, schema_version,
timestamp, data, metadata). ``event_id`` is a UUID or its 16 bytes; ``timestamp`` an aware
datetime or integer microseconds since the epoch; ``metadata`` JSON bytes or None."""


MAX_POSITION: Final = 2**63 - 1
"""Largest position, version or count the stores accept: their columns are signed 64-bit."""


def validate_position(name: str, value: object, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{name} must be an int, got {value!r:.80}")
    if value < 0:
        raise InvalidArgument(f"{name} must be >= 0, got {value}")
    if value > MAX_POSITION:
        raise InvalidArgument(f"{name} must be at most 2**63 - 1, got {value}")
    return value


def mask_password(url: str) -> str:
    """``url`` with the password of its authority and of any ``password=`` query option replaced
    by ``***``; everything else unchanged."""
    parts = urlsplit(url)
    masked = url
    if parts.password is not None:
        userinfo, _, host = parts.netloc.rpartition("@")
        masked = masked.replace(parts.netloc, f"{userinfo.partition(':')[0]}:***@{host}", 1)
    if parts.query:
        pairs = parts.query.split("&")
        for i, pair in enumerate(pairs):
            key = pair.partition("=")[0]
            if unquote_plus(key).lower() == "password":
                pairs[i] = f"{key}=***"
        # Rebuilt by replacement, not urlunsplit, which would turn sqlite:///x into sqlite:/x.
        head = masked.partition("?")[0]
        masked = f"{head}?{'&'.join(pairs)}" + (f"#{parts.fragment}" if parts.fragment else "")
    return masked


def validate_timeout(timeout: object) -> float | None:
    """Return ``timeout`` if it is None or a number of seconds >= 0, else raise :class:`InvalidArgument`."""
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout >= 0:
        raise InvalidArgument(f"timeout must be None or a number of seconds >= 0, got {timeout!r:.80}")
    return float(timeout)


def validate_text(name: str, value: object) -> str:
    """Return ``value`` if it is a str that can be stored (UTF-8 encodable, no NUL), else raise
    :class:`InvalidArgument` naming ``name``: a lone surrogate would fail deep in the driver."""
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a str, got {type(value).__qualname__}")
    if "\x00" in value:
        raise InvalidArgument(f"{name} must not contain NUL characters, got {value!r:.80}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(
            f"{name} {value!r:.80} is not valid Unicode text ({exc.reason} at index {exc.start})"
        ) from None
    return value


def now_micros() -> int:
    """The current UTC instant as integer microseconds since the epoch (stored timestamps)."""
    now = datetime.now(UTC) - _EPOCH
    return (now.days * 86_400 + now.seconds) * 1_000_000 + now.microseconds


def to_micros(instant: datetime) -> int:
    if not isinstance(instant, datetime):
        raise InvalidArgument(f"time travel needs an aware datetime, got {type(instant).__qualname__}")
    if instant.tzinfo is None:
        raise InvalidArgument(f"time travel needs an aware datetime, got naive {instant!r}")
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


class EventStore(abc.ABC):
    """An append-only store of event streams with a gap-free global log.

    Use as ``async with open_store(url) as store:``. All I/O methods are coroutines or async
    iterators; none blocks the event loop. A store is bound to the event loop that opened it.

    Guarantees, for every backend:

    * an append is atomic: all of its events are stored, or none;
    * a stream's versions are 1, 2, 3, ... with no gaps; the global positions are strictly
      increasing and a reader never skips one;
    * ``expected_version`` mismatches raise :class:`~tidings.ConcurrencyError` and write nothing;
    * re-sending an append whose events carry explicit ``event_ids`` that were already stored by that
      same append returns the original result instead of writing twice.

    ``append_calls`` and ``appended_events`` count the appends this object has committed (by
    :meth:`append`, and by a subscription's :meth:`~tidings.TrackingStore.commit_processed`) and
    their events, since it was created; an exact retry of an append counts again. They are what
    ``tidings_append_calls_total`` and ``tidings_appended_events_total`` report.
    """

    registry: EventRegistry
    url: str

    def __init__(self, url: str, *, registry: EventRegistry | None = None) -> None:
        self.url = url
        self.registry = registry if registry is not None else default_registry
        self._opened = False
        self._closed = False
        self._head_changed = asyncio.Event()
        self.append_calls = 0
        self.appended_events = 0
        self._known_head = 0

    @property
    def safe_url(self) -> str:
        """The store's URL with any password masked (in the authority and in a ``password=``
        query option), for messages and logs."""
        return mask_password(self.url)

    @property
    def is_open(self) -> bool:
        """True between a successful :meth:`open` and :meth:`close`."""
        return self._opened and not self._closed

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> Self:
        """Connect and create (or check) the schema. Idempotent."""
        if self._closed:
            raise StoreClosed(f"store {self.safe_url} is closed")
        if not self._opened:
            await self._open()
            self._opened = True
        return self

    async def close(self) -> None:
        """Finish pending writes and release connections and threads. Idempotent."""
        if self._opened and not self._closed:
            self._closed = True
            await self._close()
        self._closed = True

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed(f"store {self.safe_url} is closed")
        if not self._opened:
            raise StoreClosed(f"store {self.safe_url} is not open; use 'async with open_store(...)'")

    # -- writing --------------------------------------------------------------------------------

    async def append(
        self,
        stream_id: str,
        events: Iterable[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        metadata: Mapping[str, Any] | None = None,
        event_ids: Sequence[uuid.UUID] | None = None,
    ) -> AppendResult:
        """Append ``events`` to ``stream_id`` atomically and return the new version and position.

        ``expected_version`` is ``ANY``, ``NO_STREAM``, ``STREAM_EXISTS`` or the version of the
        stream's last event (0 = empty). ``metadata`` is stored with every event of the call.
        ``event_ids`` (one per event) make the call safely retryable: an exact retry returns the
        original result even if the stream has moved on since. A retry is recognised by its ids
        alone (the same ids, in the same order, stored consecutively in this stream, after the
        same expected version if an int was given); the payloads are not compared.

        Raises :class:`ConcurrencyError`, :class:`DuplicateEventId`, :class:`InvalidStreamId`,
        :class:`InvalidArgument`, :class:`SerializationError`; in every case nothing is written.
        """
        if tracing.enabled():
            return await self._traced_append(stream_id, events, expected_version, metadata, event_ids)
        request = self.prepare_append(
            stream_id,
            events,
            expected_version=expected_version,
            metadata=metadata,
            event_ids=event_ids,
        )
        self._check_open()
        result = await self._append(request)
        # Two integer adds on the hot path: the metrics read them at scrape time.
        self.append_calls += 1
        self.appended_events += len(request.events)
        return result

    async def _traced_append(
        self,
        stream_id: str,
        events: Iterable[Event],
        expected_version: ExpectedVersion,
        metadata: Mapping[str, Any] | None,
        event_ids: Sequence[uuid.UUID] | None,
    ) -> AppendResult:
        """:meth:`append` in a ``tidings.append`` span, which the events' traceparent names."""
        if isinstance(events, Iterable) and not isinstance(events, Event | str | bytes | Mapping):
            events = list(events)  # counted for the span, then validated by prepare_append
        count = len(events) if isinstance(events, list) else 0
        with tracing.append_span(self.safe_url, str(stream_id), count) as span:
            request = self.prepare_append(
                stream_id, events, expected_version=expected_version, metadata=metadata, event_ids=event_ids
            )
            self._check_open()
            result = await self._append(request)
            span.appended(result)
            return result

    def prepare_append(
        self,
        stream_id: str,
        events: Iterable[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        metadata: Mapping[str, Any] | None = None,
        event_ids: Sequence[uuid.UUID] | None = None,
    ) -> AppendRequest:
        """Validate and encode an append without performing it (used by batching writers)."""
        stream_id = validate_stream_id(stream_id)
        expected = validate_expected(stream_id, expected_version)
        if isinstance(events, Event | str | bytes | Mapping) or not isinstance(events, Iterable):
            raise InvalidArgument(
                f"stream {stream_id!r}: append takes a list of events, got "
                f"{'a single ' if isinstance(events, Event) else ''}{type(events).__qualname__}"
            )
        event_list = list(events)
        for i, item in enumerate(event_list):
            if not isinstance(item, Event):
                # SerializationError, as the contract has it: the item cannot be stored as an event.
                raise SerializationError(
                    f"stream {stream_id!r}: events[{i}] is not a tidings.Event but "
                    f"{type(item).__qualname__} {item!r:.60}"
                )
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidArgument(
                f"stream {stream_id!r}: metadata must be a mapping, got {type(metadata).__qualname__}"
            )
        encode = self.registry.encode
        if event_ids is None:
            ids = new_event_ids(len(event_list))
        else:
            if isinstance(event_ids, str | bytes) or not isinstance(event_ids, Iterable):
                raise InvalidArgument(
                    f"stream {stream_id!r}: event_ids must be a list of uuid.UUID, got "
                    f"{type(event_ids).__qualname__}"
                )
            ids = list(event_ids)
            if len(ids) != len(event_list):
                raise InvalidArgument(
                    f"stream {stream_id!r}: {len(ids)} event_ids given for {len(event_list)} events"
                )
            for i, value in enumerate(ids):
                if not isinstance(value, uuid.UUID):
                    raise InvalidArgument(f"event_ids[{i}] must be a uuid.UUID, got {value!r}")
            if len(set(ids)) != len(ids):
                raise InvalidArgument(f"stream {stream_id!r}: event_ids contains duplicates")
        # encode() first: it rejects non-events with a SerializationError naming the type.
        encoded = tuple(
            EncodedEvent(event_id, type(event).__event_type__, type(event).__event_version__, data)
            for event_id, event in zip(ids, event_list, strict=True)
            for data in (encode(event),)
        )
        return AppendRequest(
            stream_id,
            encoded,
            expected,
            tracing.stamped_json(metadata, self.registry.encode_metadata),
            event_ids is not None,
        )

    # -- reading --------------------------------------------------------------------------------

    async def read_stream(
        self,
        stream_id: str,
        *,
        after: int = 0,
        before: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
        raw_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent]:
        """Yield the events of ``stream_id`` with ``after < version`` (and ``< before`` if given).

        Forwards in version order, or newest first with ``backwards=True``; at most ``limit``
        events. A missing stream yields nothing. Rows are fetched in pages, so memory stays flat.

        A stored event that cannot be read back raises, when the reader reaches it,
        :class:`~tidings.CorruptEvent` (data or metadata that is not JSON or does not validate),
        :class:`~tidings.UnknownEventType` (unless ``raw_unknown``) or :class:`~tidings.UpcastError`,
        each naming the event's stream, version and position.
        """
        stream_id = validate_stream_id(stream_id)
        lower = validate_position("after", after)
        upper = validate_position("before", before, allow_none=True)
        remaining = validate_position("limit", limit, allow_none=True)
        assert lower is not None
        self._check_open()
        while remaining is None or remaining > 0:
            self._check_open()  # per page: a reader that outlives close() stops with StoreClosed
            page = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
            rows = await self._fetch_stream(stream_id, lower, upper, backwards, page)
            for recorded in self.decode_rows(rows, raw_unknown):
                yield recorded
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < page:
                return
            if backwards:
                upper = rows[-1][2]
            else:
                lower = rows[-1][2]

    async def stream_events(
        self, stream_id: str, *, after: int = 0, limit: int | None = None
    ) -> AsyncIterator[tuple[int, Event | RawEvent]]:
        """Yield ``(version, event)`` of a stream, without the envelope: the replay fast path.

        Same order, paging and errors as :meth:`read_stream`; cheaper when only the typed events
        matter (loading aggregates).
        """
        stream_id = validate_stream_id(stream_id)
        lower = validate_position("after", after)
        remaining = validate_position("limit", limit, allow_none=True)
        assert lower is not None
        self._check_open()
        validators = self.registry.validators
        decode = self.registry.decode
        while remaining is None or remaining > 0:
            self._check_open()  # per page: a reader that outlives close() stops with StoreClosed
            page = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
            rows = await self._fetch_stream_data(stream_id, lower, page)
            for position, version, event_type, schema_version, data in rows:
                validate = validators.get((event_type, schema_version))
                if validate is not None:
                    try:
                        yield version, validate(data)
                        continue
                    except ValidationError:
                        pass
                yield (
                    version,
                    decode(
                        event_type,
                        schema_version,
                        data,
                        stream_id=stream_id,
                        position=position,
                        version=version,
                    ),
                )
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < page:
                return
            lower = rows[-1][1]

    async def read_all(
        self,
        *,
        after: int = 0,
        event_types: Iterable[str | type[Event]] | None = None,
        stream_prefix: str | None = None,
        limit: int | None = None,
        raw_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent]:
        """Yield the global log in position order, from position ``after`` (exclusive).

        ``event_types`` keeps only those types (names or classes); ``stream_prefix`` only streams
        whose id starts with it (a category such as ``"order-"``). Streamed in pages. Unreadable
        stored events raise as in :meth:`read_stream`.
        """
        lower = validate_position("after", after)
        remaining = validate_position("limit", limit, allow_none=True)
        assert lower is not None
        types = _type_names(event_types)
        if stream_prefix is not None:
            validate_text("stream_prefix", stream_prefix)
        self._check_open()
        while remaining is None or remaining > 0:
            self._check_open()  # per page: a reader that outlives close() stops with StoreClosed
            page = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
            rows, scanned_to = await self._fetch_all(lower, types, stream_prefix, page)
            for recorded in self.decode_rows(rows, raw_unknown):
                yield recorded
            if remaining is not None:
                remaining -= len(rows)
            if scanned_to is None:
                return
            lower = scanned_to

    async def read_all_stored(
        self,
        *,
        after: int = 0,
        event_types: Iterable[str | type[Event]] | None = None,
        stream_prefix: str | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[StoredEvent]:
        """Like :meth:`read_all`, but yield the events as stored, without decoding them.

        For tools that must see an event even when it no longer decodes (an unknown type, data
        that fails validation, a broken upcaster): a subscription parks such an event as a dead
        letter by its envelope.
        """
        lower = validate_position("after", after)
        remaining = validate_position("limit", limit, allow_none=True)
        assert lower is not None
        types = _type_names(event_types)
        if stream_prefix is not None and not isinstance(stream_prefix, str):
            raise InvalidArgument(f"stream_prefix must be a str, got {stream_prefix!r}")
        self._check_open()
        while remaining is None or remaining > 0:
            self._check_open()  # per page: a reader that outlives close() stops with StoreClosed
            page = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
            rows, scanned_to = await self._fetch_all(lower, types, stream_prefix, page)
            for row in rows:
                yield stored_event(row)
            if remaining is not None:
                remaining -= len(rows)
            if scanned_to is None:
                return
            lower = scanned_to

    async def read_correlated(
        self,
        correlation_ids: Iterable[str],
        *,
        limit: int | None = None,
        raw_unknown: bool = False,
    ) -> AsyncIterator[RecordedEvent]:
        """Yield, in position order, the events of the conversations ``correlation_ids``.

        An event belongs to conversation ``c`` when its metadata's ``correlation_id`` is ``c``, or
        when its own event id is ``c``: the event that starts a conversation carries no
        correlation id, and everything it causes is correlated to its id. SQLite and PostgreSQL
        answer from an index on the metadata's correlation id (plus the event id index), never by
        scanning the log. A correlation id must be a JSON string in the metadata to be found;
        metadata that holds a ``\\u0000`` escape is not indexed on PostgreSQL (it cannot be
        read as text there) and such events are not found.

        At most :data:`MAX_CORRELATION_IDS` ids per call; raises :class:`InvalidArgument` for more,
        for a str instead of a list, or for an id that is not text. Unreadable stored events raise
        as in :meth:`read_stream`; :meth:`read_correlated_stored` reads them without decoding.
        """
        ids, event_ids = _correlation_args(correlation_ids)
        remaining = validate_position("limit", limit, allow_none=True)
        self._check_open()
        async for rows in self._correlated_pages(ids, event_ids, remaining):
            for recorded in self.decode_rows(rows, raw_unknown):
                yield recorded

    async def read_correlated_stored(
        self, correlation_ids: Iterable[str], *, limit: int | None = None
    ) -> AsyncIterator[StoredEvent]:
        """Like :meth:`read_correlated`, but yield the events as stored, without decoding them
        (for tools such as the causal trace, which must show an event that no longer decodes)."""
        ids, event_ids = _correlation_args(correlation_ids)
        remaining = validate_position("limit", limit, allow_none=True)
        self._check_open()
        async for rows in self._correlated_pages(ids, event_ids, remaining):
            for row in rows:
                yield stored_event(row)

    async def _correlated_pages(
        self, ids: tuple[str, ...], event_ids: tuple[uuid.UUID, ...], remaining: int | None
    ) -> AsyncIterator[list[Row]]:
        lower = 0
        if not ids:
            return
        while remaining is None or remaining > 0:
            self._check_open()  # per page: a reader that outlives close() stops with StoreClosed
            page = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
            rows = await self._fetch_correlated(ids, event_ids, lower, page)
            yield rows
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < page:
                return
            lower = rows[-1][0]

    async def _fetch_correlated(
        self, ids: tuple[str, ...], event_ids: tuple[uuid.UUID, ...], after: int, limit: int
    ) -> list[Row]:
        """Up to ``limit`` rows after position ``after``, in position order, whose metadata's
        correlation id is in ``ids`` or whose event id is in ``event_ids``.

        This default scans the global log, so that a backend written before correlated reads
        existed still answers correctly; the shipped backends override it with an indexed read.
        """
        wanted = set(ids)
        wanted_ids = set(event_ids)
        out: list[Row] = []
        lower: int | None = after
        while lower is not None:
            rows, lower = await self._fetch_all(lower, None, None, PAGE_SIZE)
            for row in rows:
                if uuid_from_bytes(row[3]) in wanted_ids or correlation_of(row[8]) in wanted:
                    out.append(row)
                    if len(out) == limit:
                        return out
        return out

    def decode_rows(self, rows: Sequence[Row], raw_unknown: bool = False) -> list[RecordedEvent]:
        """Decode a page of stored rows. The common case (a registered type at its current schema
        version) goes straight to the model's JSON validator; everything else takes
        :meth:`EventRegistry.decode`, which upcasts, reads raw or raises."""
        validators = self.registry.validators
        decode = self.registry.decode
        out: list[RecordedEvent] = []
        append = out.append
        for row in rows:
            position, stream_id, version, event_id, event_type, schema_version, ts, data, meta = row
            validate = validators.get((event_type, schema_version))
            event: Event | RawEvent
            if validate is not None:
                try:
                    event = validate(data)
                except ValidationError:
                    event = decode(
                        event_type,
                        schema_version,
                        data,
                        stream_id=stream_id,
                        position=position,
                        version=version,
                    )
            else:
                event = decode(
                    event_type,
                    schema_version,
                    data,
                    raw_unknown=raw_unknown,
                    stream_id=stream_id,
                    position=position,
                    version=version,
                )
            append(
                RecordedEvent(
                    event_id,
                    event_type,
                    stream_id,
                    version,
                    position,
                    ts,
                    event,
                    _EMPTY if meta is None else _load_metadata(meta, row),
                    schema_version,
                )
            )
        return out

    def read_recent(
        self,
        after: int,
        upto: int,
        *,
        event_types: tuple[str, ...] | None = None,
        stream_prefix: str | None = None,
        raw_unknown: bool = False,
    ) -> list[RecordedEvent] | None:
        """The events with ``after < position <= upto`` (filtered as by :meth:`read_all`) from
        this process's memory of its own latest commits, or None unless it holds every one of
        those positions. No database read: a live subscriber takes what was just appended here.

        ``upto`` must be a committed position (such as :meth:`known_head`); positions past it
        are not looked at. Decoding errors raise as in :meth:`read_all`.
        """
        rows = self._recent_rows(after, upto)
        if rows is None:
            return None
        if event_types is not None or stream_prefix is not None:
            rows = [
                row
                for row in rows
                if (event_types is None or row[4] in event_types)
                and (stream_prefix is None or row[1].startswith(stream_prefix))
            ]
        return self.decode_rows(rows, raw_unknown)

    def _recent_rows(self, after: int, upto: int) -> list[Row] | None:
        """Backend hook for :meth:`read_recent`: the stored rows of positions ``after + 1`` to
        ``upto``, all of them and in order, or None. By default nothing is remembered."""
        return None

    async def stream_version(self, stream_id: str) -> int:
        """The version of the stream's last event; 0 for a missing stream."""
        stream_id = validate_stream_id(stream_id)
        self._check_open()
        return await self._stream_version(stream_id)

    async def head(self) -> int:
        """The global position of the last stored event; 0 for an empty store."""
        self._check_open()
        head = await self._head()
        if head > self._known_head:
            self._known_head = head
        return head

    async def streams(self, *, prefix: str | None = None) -> AsyncIterator[StreamInfo]:
        """Yield every stream (optionally only ids starting with ``prefix``), ordered by id."""
        if prefix is not None:
            validate_text("prefix", prefix)
        self._check_open()
        after: str | None = None
        while True:
            page = await self._list_streams(prefix, after, PAGE_SIZE)
            for info in page:
                yield info
            if len(page) < PAGE_SIZE:
                return
            after = page[-1].stream_id

    async def version_at(self, stream_id: str, instant: datetime) -> int:
        """The stream's version as of ``instant`` (events with timestamp <= instant); 0 if none."""
        stream_id = validate_stream_id(stream_id)
        micros = to_micros(instant)
        self._check_open()
        return await self._version_at(stream_id, micros)

    # -- snapshots ------------------------------------------------------------------------------

    async def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a snapshot; one per (stream, version), a later save for the same pair replaces it."""
        if not isinstance(snapshot, Snapshot):
            raise InvalidArgument(f"save_snapshot takes a Snapshot, got {type(snapshot).__qualname__}")
        validate_stream_id(snapshot.stream_id)
        validate_position("snapshot version", snapshot.version)
        validate_text("snapshot aggregate_type", snapshot.aggregate_type)
        validate_text("snapshot schema", snapshot.schema)
        if not isinstance(snapshot.state, bytes):
            raise InvalidArgument(f"snapshot state must be bytes, got {type(snapshot.state).__qualname__}")
        self._check_open()
        await self._save_snapshot(snapshot)

    async def load_snapshot(self, stream_id: str, *, max_version: int | None = None) -> Snapshot | None:
        """The latest snapshot of ``stream_id`` at or below ``max_version`` (any, if None)."""
        stream_id = validate_stream_id(stream_id)
        validate_position("max_version", max_version, allow_none=True)
        self._check_open()
        return await self._load_snapshot(stream_id, max_version)

    # -- change notification ---------------------------------------------------------------------

    def _notify_appended(self, head: int | None = None) -> None:
        """Wake everyone waiting in :meth:`wait_for_append`; call on the store's loop after commit.

        ``head``, when the backend knows it, is a position its commit made durable: waiters take
        it from here instead of asking the database (a round trip to a reader thread each).
        """
        if head is not None and head > self._known_head:
            self._known_head = head
        event = self._head_changed
        self._head_changed = asyncio.Event()
        event.set()

    def known_head(self) -> int:
        """The highest position this process has seen committed, without asking the database.

        Never above the real head (it only rises, from this process's own commits and the heads
        it read); it may be below it, e.g. when another process appended. 0 if nothing is known.
        """
        return self._known_head

    async def wait_for_append(self, position: int, timeout: float | None = None) -> int:
        """Wait until the head is beyond ``position`` (or ``timeout`` passes); return the head.

        In-process appends wake waiters at once; appends by other processes are seen by the
        backend's change detection (a cheap poll, or LISTEN/NOTIFY), bounded by ``timeout``.
        """
        validate_position("position", position)
        validate_timeout(timeout)
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            waiter = self._head_changed
            # A commit of this process that passed ``position`` answers without a database read.
            head = self._known_head
            if head <= position:
                head = await self._head()
                if head > self._known_head:
                    self._known_head = head
            if head > position:
                return head
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return head
            # A wake-up may be for a write that did not move the head (a checkpoint, a
            # snapshot): check again rather than return early.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), remaining)

    # -- backend primitives -------------------------------------------------------------------------

    @abc.abstractmethod
    async def _open(self) -> None: ...

    @abc.abstractmethod
    async def _close(self) -> None: ...

    @abc.abstractmethod
    async def _append(self, request: AppendRequest) -> AppendResult: ...

    @abc.abstractmethod
    async def _fetch_stream(
        self, stream_id: str, after: int, before: int | None, backwards: bool, limit: int
    ) -> list[Row]: ...

    async def _fetch_stream_data(
        self, stream_id: str, after: int, limit: int
    ) -> Sequence[tuple[int, int, str, int, Any]]:
        """``(position, version, event_type, schema_version, data)`` of a stream's events after
        version ``after``, forwards: what a replay needs. A backend may select just these
        columns; by default they are cut from :meth:`_fetch_stream`'s rows."""
        rows = await self._fetch_stream(stream_id, after, None, False, limit)
        return [(r[0], r[2], r[4], r[5], r[7]) for r in rows]

    @abc.abstractmethod
    async def _fetch_all(
        self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int
    ) -> tuple[list[Row], int | None]:
        """Up to ``limit`` matching rows after ``after``, and the position the scan reached
        (None when the log is exhausted) so that filtered reads page without rescanning."""

    @abc.abstractmethod
    async def _stream_version(self, stream_id: str) -> int: ...

    @abc.abstractmethod
    async def _head(self) -> int: ...

    @abc.abstractmethod
    async def _list_streams(self, prefix: str | None, after: str | None, limit: int) -> list[StreamInfo]: ...

    @abc.abstractmethod
    async def _version_at(self, stream_id: str, micros: int) -> int: ...

    @abc.abstractmethod
    async def _save_snapshot(self, snapshot: Snapshot) -> None: ...

    @abc.abstractmethod
    async def _load_snapshot(self, stream_id: str, max_version: int | None) -> Snapshot | None: ...


def _type_names(event_types: Iterable[str | type[Event]] | None) -> tuple[str, ...] | None:
    if event_types is None:
        return None
    if isinstance(event_types, str) or (isinstance(event_types, type) and issubclass(event_types, Event)):
        event_types = [event_types]
    if not isinstance(event_types, Iterable):
        raise InvalidArgument(
            f"event_types must be a list of type names or Event classes, got {event_types!r:.80}"
        )
    names: list[str] = []
    for item in event_types:
        if isinstance(item, str):
            names.append(validate_text("event type", item))
        elif isinstance(item, type) and issubclass(item, Event):
            names.append(item.__event_type__)
        else:
            raise InvalidArgument(f"event_types must hold type names or Event classes, got {item!r}")
    return tuple(dict.fromkeys(names))


MAX_CORRELATION_IDS: Final = 500
"""Most correlation ids one :meth:`EventStore.read_correlated` call takes (each is a bound
parameter; SQLite allows a few thousand per statement)."""


def _correlation_args(correlation_ids: object) -> tuple[tuple[str, ...], tuple[uuid.UUID, ...]]:
    """The validated, de-duplicated ids of a correlated read, and those of them that are event ids."""
    if isinstance(correlation_ids, str | bytes) or not isinstance(correlation_ids, Iterable):
        raise InvalidArgument(
            f"correlation_ids must be a list of str, got {type(correlation_ids).__qualname__}"
        )
    ids = tuple(dict.fromkeys(validate_text("correlation id", value) for value in correlation_ids))
    if len(ids) > MAX_CORRELATION_IDS:
        raise InvalidArgument(
            f"at most {MAX_CORRELATION_IDS} correlation ids per read, got {len(ids)}; read them in chunks"
        )
    event_ids: list[uuid.UUID] = []
    for value in ids:
        try:
            event_ids.append(uuid.UUID(value))
        except ValueError:
            continue
    return ids, tuple(event_ids)


def correlation_of(metadata: Any) -> str | None:
    """The correlation id in stored metadata (JSON bytes, text or a dict), as text; None when it
    has none or is not a JSON object."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        try:
            metadata = orjson.loads(metadata)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(metadata, dict):
            return None
    value = metadata.get("correlation_id")
    return None if value is None else str(value)


def stored_event(row: Row) -> StoredEvent:
    """A stored row as a :class:`StoredEvent` (ids and timestamps in their Python types)."""
    position, stream_id, version, event_id, event_type, schema, ts, data, meta = row
    return StoredEvent(
        position,
        stream_id,
        version,
        uuid_from_bytes(event_id),
        event_type,
        schema,
        datetime_from_micros(ts),
        _as_bytes(data),
        None if meta is None else _as_bytes(meta),
    )


def _as_bytes(value: Any) -> bytes:
    """Stored JSON as bytes (a database may hand back a memoryview, or text a foreign writer put in)."""
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


def _load_metadata(meta: Any, row: Row) -> Mapping[str, Any]:
    if meta is None:
        return _EMPTY
    if isinstance(meta, dict):
        return meta
    try:
        value = orjson.loads(meta)
    except orjson.JSONDecodeError as exc:
        value = exc
    if not isinstance(value, dict):
        raise CorruptEvent(
            f"its metadata is not a JSON object: {value}",
            event_type=row[4],
            schema_version=row[5],
            stream_id=row[1],
            version=row[2],
            position=row[0],
        ) from (value if isinstance(value, Exception) else None)
    return value


_EMPTY: Mapping[str, Any] = MappingProxyType({})
