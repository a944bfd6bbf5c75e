"""The event store contract and the logic every backend shares.

A backend subclasses :class:`EventStore` and implements a handful of primitives over stored rows
(``_append``, ``_fetch_stream``, ``_fetch_all`` ...). Validation, encoding, decoding, upcasting and
the expected-version / idempotent-append rules live here once, so every backend behaves the same and
the contract suite in :mod:`tidings.testing` can hold them all to it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import enum
import os
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Final, NamedTuple, Self, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

import orjson
from pydantic import ValidationError

from tidings.errors import (
    ConcurrencyError,
    CorruptEvent,
    DuplicateEventId,
    InvalidArgument,
    InvalidStreamId,
    SerializationError,
    StoreClosed,
)
from tidings.events import (
    Event,
    EventRegistry,
    RawEvent,
    RecordedEvent,
    default_registry,
    uuid_from_bytes,
)

if TYPE_CHECKING:
    from tidings.store.records import DeadLetter, ProcessedBatch, Tx

T = TypeVar("T")

__all__ = [
    "ANY",
    "MAX_STREAM_ID_LENGTH",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendRequest",
    "AppendResult",
    "EncodedEvent",
    "EventStore",
    "ExpectedVersion",
    "Row",
    "Snapshot",
    "StreamInfo",
]

MAX_STREAM_ID_LENGTH: Final = 512
"""Longest accepted stream id, in characters."""

PAGE_SIZE: Final = 1000
"""Rows fetched per round trip by the streaming readers; bounds their memory."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class StreamState(enum.Enum):
    """Symbolic expected versions for :meth:`EventStore.append`."""

    ANY = "any"
    NO_STREAM = "no stream"
    STREAM_EXISTS = "stream exists"

    def __str__(self) -> str:
        return self.name


ANY: Final = StreamState.ANY
"""Append whatever the stream's version is."""
NO_STREAM: Final = StreamState.NO_STREAM
"""Append only if the stream has no events (same as ``expected_version=0``)."""
STREAM_EXISTS: Final = StreamState.STREAM_EXISTS
"""Append only if the stream has at least one event."""

ExpectedVersion: TypeAlias = int | StreamState


@dataclasses.dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append did: the stream's version after it and the global position of its last event."""

    version: int
    position: int


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


class EncodedEvent(NamedTuple):
    """An event ready to be written: id, type name, schema version and JSON bytes.

    A named tuple rather than a frozen dataclass: an append builds one per event, and a tuple
    is built in C several times faster.
    """

    event_id: uuid.UUID
    event_type: str
    schema_version: int
    data: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class AppendRequest:
    """One validated, encoded call to :meth:`EventStore.append`, as handed to a backend."""

    stream_id: str
    events: tuple[EncodedEvent, ...]
    expected: ExpectedVersion
    metadata: bytes | None
    explicit_ids: bool

    def resolve(
        self, current_version: int, current_position: int, existing: Sequence[tuple[Any, ...]]
    ) -> AppendResult | None:
        """Apply the idempotency and expected-version rules.

        ``existing`` holds ``(event_id, stream_id, version, position)`` for those of this request's
        event ids that are already stored (backends look them up only when ids were explicit).
        Returns the original result for an exact retry, ``None`` when the append should go ahead,
        and raises :class:`DuplicateEventId` or :class:`ConcurrencyError` otherwise.
        """
        if existing:
            original = self._match_retry(existing)
            if original is not None:
                return original
        check_expected(self.stream_id, self.expected, current_version)
        if not self.events:
            return AppendResult(current_version, current_position)
        return None

    def _match_retry(self, existing: Sequence[tuple[Any, ...]]) -> AppendResult | None:
        found = {uuid_from_bytes(row[0]): row for row in existing}
        first = found.get(self.events[0].event_id)
        if len(found) == len(self.events) and first is not None and first[1] == self.stream_id:
            start = int(first[2])
            retry = all(
                (row := found.get(e.event_id)) is not None
                and row[1] == self.stream_id
                and int(row[2]) == start + i
                for i, e in enumerate(self.events)
            )
            expected_ok = not isinstance(self.expected, int) or self.expected == start - 1
            if retry and expected_ok:
                last = found[self.events[-1].event_id]
                return AppendResult(int(last[2]), int(last[3]))
        for e in self.events:
            row = found.get(e.event_id)
            if row is not None:
                raise DuplicateEventId(
                    e.event_id,
                    self.stream_id,
                    f"it is already stored in stream {row[1]!r} at version {row[2]}, and this "
                    "append is not an exact retry of the one that stored it",
                )
        raise AssertionError("unreachable: existing rows match no requested id")


def check_expected(stream_id: str, expected: ExpectedVersion, actual: int) -> None:
    """Raise :class:`ConcurrencyError` unless ``actual`` satisfies ``expected``."""
    if expected is ANY:
        return
    if expected is NO_STREAM:
        ok = actual == 0
    elif expected is STREAM_EXISTS:
        ok = actual > 0
    else:
        ok = actual == expected
    if not ok:
        raise ConcurrencyError(stream_id, expected, actual)


Row: TypeAlias = tuple[Any, ...]
"""A stored event: (position, stream_id, version, event_id, event_type, schema_version,
timestamp, data, metadata). ``event_id`` is a UUID or its 16 bytes; ``timestamp`` an aware
datetime or integer microseconds since the epoch; ``metadata`` JSON bytes or None."""


def validate_stream_id(stream_id: object) -> str:
    """Return ``stream_id`` if it is an acceptable stream id, else raise :class:`InvalidStreamId`."""
    if not isinstance(stream_id, str):
        raise InvalidStreamId(stream_id, f"must be a str, not {type(stream_id).__qualname__}")
    if not stream_id:
        raise InvalidStreamId(stream_id, "must not be empty")
    if len(stream_id) > MAX_STREAM_ID_LENGTH:
        raise InvalidStreamId(
            stream_id, f"is {len(stream_id)} characters long; the limit is {MAX_STREAM_ID_LENGTH}"
        )
    if "\x00" in stream_id:
        raise InvalidStreamId(stream_id, "must not contain NUL characters")
    return stream_id


MAX_GROUP_LENGTH: Final = 200


def validate_group(group: object) -> str:
    """Return ``group`` if it is an acceptable subscription group name, else raise."""
    if not isinstance(group, str) or not group or len(group) > MAX_GROUP_LENGTH or "\x00" in group:
        raise InvalidArgument(
            f"subscription group must be a non-empty str of at most {MAX_GROUP_LENGTH} characters, "
            f"got {group!r:.80}"
        )
    return validate_text("subscription group", group)


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


def validate_expected(stream_id: str, expected: object) -> ExpectedVersion:
    if isinstance(expected, StreamState):
        return expected
    if isinstance(expected, int) and not isinstance(expected, bool) and 0 <= expected <= MAX_POSITION:
        return expected
    raise InvalidArgument(
        f"stream {stream_id!r}: expected_version must be ANY, NO_STREAM, STREAM_EXISTS or an "
        f"int from 0 to 2**63 - 1, got {expected!r:.80}"
    )


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


_new_object = object.__new__
_set_attribute = object.__setattr__
_from_bytes = int.from_bytes


def new_event_ids(count: int) -> list[uuid.UUID]:
    """``count`` new event ids: time-ordered UUIDs (version 7, RFC 9562) from one system call.

    Time order matters for the stores: ids that grow with time land at the right edge of the
    unique event-id index, so a commit dirties a few pages instead of one random page per event
    (random version 4 ids made commits several times slower on large stores). The 74 random bits
    keep ids unguessable and collision-free.
    """
    raw = os.urandom(10 * count)
    millis = time.time_ns() // 1_000_000
    prefix = (millis & 0xFFFF_FFFF_FFFF) << 80 | 0x7 << 76
    out = []
    for offset in range(0, 10 * count, 10):
        rand = _from_bytes(raw[offset : offset + 10])  # 80 random bits; 74 are used
        value = prefix | (rand >> 68) << 64 | 0b10 << 62 | (rand & 0x3FFF_FFFF_FFFF_FFFF)
        result = _new_object(uuid.UUID)
        _set_attribute(result, "int", value)
        _set_attribute(result, "is_safe", uuid.SafeUUID.unknown)
        out.append(result)
    return out


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
    """

    registry: EventRegistry
    url: str

    def __init__(self, url: str, *, registry: EventRegistry | None = None) -> None:
        self.url = url
        self.registry = registry if registry is not None else default_registry
        self._opened = False
        self._closed = False
        self._head_changed = asyncio.Event()
        self._checkpoint_changed = asyncio.Event()

    @property
    def safe_url(self) -> str:
        """The store's URL with any password masked, for messages and logs."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True between a successful :meth:`open` and :meth:`close`."""
        return self._opened and not self._closed

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
        request = self.prepare_append(
            stream_id,
            events,
            expected_version=expected_version,
            metadata=metadata,
            event_ids=event_ids,
        )
        self._check_open()
        return await self._append(request)

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
            self.registry.encode_metadata(metadata),
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
            page = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
            rows = await self._fetch_stream(stream_id, lower, None, False, page)
            for row in rows:
                validate = validators.get((row[4], row[5]))
                if validate is not None:
                    try:
                        yield row[2], validate(row[7])
                        continue
                    except ValidationError:
                        pass
                yield (
                    row[2],
                    decode(row[4], row[5], row[7], stream_id=stream_id, position=row[0], version=row[2]),
                )
            if remaining is not None:
                remaining -= len(rows)
            if len(rows) < page:
                return
            lower = rows[-1][2]

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
            page = PAGE_SIZE if remaining is None else min(PAGE_SIZE, remaining)
            rows, scanned_to = await self._fetch_all(lower, types, stream_prefix, page)
            for recorded in self.decode_rows(rows, raw_unknown):
                yield recorded
            if remaining is not None:
                remaining -= len(rows)
            if scanned_to is None:
                return
            lower = scanned_to

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

    async def stream_version(self, stream_id: str) -> int:
        """The version of the stream's last event; 0 for a missing stream."""
        stream_id = validate_stream_id(stream_id)
        self._check_open()
        return await self._stream_version(stream_id)

    async def head(self) -> int:
        """The global position of the last stored event; 0 for an empty store."""
        self._check_open()
        return await self._head()

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

    def _notify_appended(self) -> None:
        """Wake everyone waiting in :meth:`wait_for_append`; call on the store's loop after commit."""
        event = self._head_changed
        self._head_changed = asyncio.Event()
        event.set()

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
            head = await self._head()
            if head > position:
                return head
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return head
            # A wake-up may be for a write that did not move the head (a checkpoint, a
            # snapshot): check again rather than return early.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), remaining)

    # -- processing records (checkpoints, inbox, dead letters) -------------------------------------

    async def load_checkpoint(self, group: str) -> int:
        """The position up to which ``group`` has processed the log (0 if never)."""
        self._check_open()
        return await self._load_checkpoint(validate_group(group))

    async def checkpoints(self) -> dict[str, int]:
        """Every subscription group's checkpoint."""
        self._check_open()
        return await self._checkpoints()

    async def commit_processed(self, batch: ProcessedBatch) -> list[AppendResult]:
        """Commit one step of a subscription atomically (see :class:`ProcessedBatch`).

        Returns the results of the batch's appends. Raises :class:`~tidings.CheckpointConflict`
        when another runner moved the group's checkpoint; any error means nothing was written.
        """
        validate_group(batch.group)
        self._check_open()
        results = await self._commit_processed(batch)
        self._notify_checkpoint()
        if batch.appends:
            self._notify_appended()
        return results

    async def processed_ids(self, group: str, event_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Those of ``event_ids`` that ``group`` has recorded as processed (its inbox)."""
        group = validate_group(group)
        ids = _uuid_list("event_ids", event_ids)
        self._check_open()
        if not ids:
            return set()
        return await self._processed_ids(group, ids)

    async def dead_letters(self, group: str | None = None) -> list[DeadLetter]:
        """Parked events, oldest first, optionally of one group."""
        self._check_open()
        return await self._dead_letters(None if group is None else validate_group(group), None)

    async def dead_letter(self, id: int) -> DeadLetter | None:
        """One parked event by its id, or None."""
        validate_position("dead letter id", id)
        self._check_open()
        found = await self._dead_letters(None, id)
        return found[0] if found else None

    async def discard_dead_letter(self, id: int) -> bool:
        """Delete a parked event without processing it; False if there was none with that id."""
        validate_position("dead letter id", id)
        self._check_open()
        return await self._discard_dead_letter(id)

    async def set_checkpoint(self, group: str, position: int | None) -> None:
        """Move ``group``'s checkpoint by hand (None deletes it, so the group replays history)."""
        validate_position("position", position, allow_none=True)
        self._check_open()
        await self._set_checkpoint(validate_group(group), position)
        self._notify_checkpoint()

    async def transaction(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn(tx)`` in one write transaction of the store's database and return its result.

        ``fn`` is synchronous and runs on the store's worker; it must not do other I/O.
        """
        if not callable(fn) or asyncio.iscoroutinefunction(fn):
            raise InvalidArgument(f"transaction() takes a synchronous function of a Tx, got {fn!r:.80}")
        self._check_open()
        return await self._transaction(fn)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only SQL query (``?`` placeholders) on the store's database: read models."""
        validate_text("SQL", sql)
        if isinstance(params, str | bytes) or not isinstance(params, Sequence | Mapping):
            raise InvalidArgument(f"query parameters must be a sequence, got {type(params).__qualname__}")
        self._check_open()
        return await self._query(sql, params)

    def group_lock(self, group: str) -> asyncio.Lock:
        """The lock that lets one runner per subscription group work in this process at a time.

        Shared by every store object of this process that opens the same database (two services
        built from the same URL), so their runners of one group take turns instead of both
        handling every event. Across processes the checkpoint's compare-and-set keeps commits
        exactly-once.
        """
        key = (self.database_identity(), validate_group(group))
        lock = _GROUP_LOCKS.get(key)
        if lock is None:
            lock = asyncio.Lock()
            _GROUP_LOCKS[key] = lock
        return lock

    def database_identity(self) -> str:
        """A key naming the database behind this store (same database -> same key)."""
        return f"{type(self).__name__}:{id(self)}"

    def _notify_checkpoint(self) -> None:
        event = self._checkpoint_changed
        self._checkpoint_changed = asyncio.Event()
        event.set()

    async def wait_for(self, position: int, *, group: str, timeout: float | None = None) -> bool:
        """Wait until ``group`` has processed ``position`` (read-your-writes for read models).

        Returns True once the group's checkpoint is at or past ``position``, False on timeout.
        Checkpoints committed in this process wake the waiter at once; others are polled.
        """
        validate_position("position", position)
        validate_timeout(timeout)
        group = validate_group(group)
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            changed = self._checkpoint_changed
            if await self._load_checkpoint(group) >= position:
                return True
            wait = 0.05 if deadline is None else min(0.05, deadline - loop.time())
            if wait <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)

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

    @abc.abstractmethod
    async def _load_checkpoint(self, group: str) -> int: ...

    @abc.abstractmethod
    async def _checkpoints(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def _set_checkpoint(self, group: str, position: int | None) -> None: ...

    @abc.abstractmethod
    async def _commit_processed(self, batch: ProcessedBatch) -> list[AppendResult]: ...

    @abc.abstractmethod
    async def _processed_ids(self, group: str, event_ids: list[uuid.UUID]) -> set[uuid.UUID]: ...

    @abc.abstractmethod
    async def _dead_letters(self, group: str | None, id: int | None) -> list[DeadLetter]: ...

    @abc.abstractmethod
    async def _discard_dead_letter(self, id: int) -> bool: ...

    @abc.abstractmethod
    async def _transaction(self, fn: Callable[[Tx], T]) -> T: ...

    @abc.abstractmethod
    async def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]: ...


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


def _uuid_list(name: str, values: object) -> list[uuid.UUID]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise InvalidArgument(f"{name} must be a list of uuid.UUID, got {type(values).__qualname__}")
    out = list(values)
    for i, value in enumerate(out):
        if not isinstance(value, uuid.UUID):
            raise InvalidArgument(f"{name}[{i}] must be a uuid.UUID, got {value!r:.80}")
    return out


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

# Weak values: a group's lock lives as long as some runner holds or waits for it.
_GROUP_LOCKS: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()
