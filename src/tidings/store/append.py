"""The append vocabulary, and the one append planner every backend uses.

An append reaches a backend as an :class:`AppendRequest`: validated and encoded by
:meth:`EventStore.prepare_append <tidings.store.base.EventStore.prepare_append>`. Backends write
requests in batches (group commit). For a batch, the backend looks up the current version of each
stream involved and where any explicitly given event ids are already stored, and hands both to
:func:`plan_appends`, which applies the rules -- expected versions, exact retries, duplicate ids --
once for every backend, and decides for each request, in order: write these events at these
versions, return the original result of an exact retry, or fail with its own error. A request that
fails never affects the others of its batch; later requests see the effect of earlier accepted
ones (same stream, same ids) exactly as if they had run one after another.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Final, NamedTuple, TypeAlias

from tidings.errors import ConcurrencyError, DuplicateEventId, InvalidArgument, InvalidStreamId, TidingsError

__all__ = [
    "ANY",
    "MAX_STREAM_ID_LENGTH",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendPlan",
    "AppendRequest",
    "AppendResult",
    "EncodedEvent",
    "ExpectedVersion",
    "PlannedEvent",
    "StoredId",
    "StreamState",
    "check_expected",
    "new_event_ids",
    "plan_appends",
    "validate_expected",
    "validate_stream_id",
]


class StreamState(enum.Enum):
    """Symbolic expected versions for :meth:`EventStore.append <tidings.EventStore.append>`."""

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
"""What an append expects of its stream: ``ANY``, ``NO_STREAM``, ``STREAM_EXISTS`` or the version of
the stream's last event (0 = empty)."""


@dataclasses.dataclass(frozen=True, slots=True)
class AppendResult:
    """What an append did: the stream's version after it and the global position of its last event."""

    version: int
    position: int


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
    """One validated, encoded call to :meth:`EventStore.append <tidings.EventStore.append>`, as
    handed to a backend (build it with :meth:`~tidings.EventStore.prepare_append`).

    ``explicit_ids`` says whether the caller gave the event ids (only then can the append be an
    exact retry, so only then do backends look the ids up).
    """

    stream_id: str
    events: tuple[EncodedEvent, ...]
    expected: ExpectedVersion
    metadata: bytes | None
    explicit_ids: bool


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


class StoredId(NamedTuple):
    """Where an event id is stored: its stream, version and global position."""

    stream_id: str
    version: int
    position: int


class PlannedEvent(NamedTuple):
    """One event an :class:`AppendPlan` writes: at ``base + offset`` in the global log (``offset``
    counts the plan's events from 1), as ``version`` of ``stream_id``."""

    offset: int
    stream_id: str
    version: int
    event: EncodedEvent
    metadata: bytes | None


@dataclasses.dataclass(slots=True)
class AppendPlan:
    """What a batch of appends writes, and each request's outcome.

    ``events`` are the rows to insert, in position order. The batch's positions depend on where it
    lands in the log (``base``, the head when it is written), so outcomes hold a *pending* position
    ``-offset`` for a result that refers to an event of this plan; :meth:`outcomes_at` resolves
    them. Stored positions are >= 0, so the two never mix up.
    """

    events: list[PlannedEvent]
    outcomes: list[AppendResult | TidingsError]

    def outcomes_at(self, base: int) -> list[AppendResult | TidingsError]:
        """Each request's result (or error), for the plan's events written after position ``base``."""
        return [
            AppendResult(o.version, base - o.position)
            if isinstance(o, AppendResult) and o.position < 0
            else o
            for o in self.outcomes
        ]


def plan_appends(
    requests: Sequence[AppendRequest],
    streams: Mapping[str, tuple[int, int]],
    stored: Mapping[uuid.UUID, StoredId],
) -> AppendPlan:
    """Decide, for each of ``requests`` in order, what to do; a pure function.

    ``streams`` maps each existing stream of the batch to ``(version, position)`` of its last event
    (missing streams are empty: ``(0, 0)``); ``stored`` maps those of the requests' explicit event
    ids that are already stored to where they are. Per request, the outcome is:

    * its events to write, at the stream's next versions (result: the new version and position);
    * for an exact retry of the append that stored its ids (the same ids, in the same order,
      stored consecutively in this stream, after the same expected version if an int was given),
      the original result, and nothing to write;
    * for no events, the stream's current version and position (if the expectation holds);
    * its own error -- :class:`ConcurrencyError` or :class:`DuplicateEventId` -- and nothing to write.

    An error of one request never changes what the others do, except that what a rejected request
    would have written is not seen by later requests.
    """
    current = dict(streams)
    known = dict(stored)
    plan = AppendPlan([], [])
    for request in requests:
        stream_id = request.stream_id
        version, last = current.get(stream_id, (0, 0))
        try:
            original = _original_result(request, known) if request.explicit_ids else None
            if original is not None:
                plan.outcomes.append(original)
                continue
            check_expected(stream_id, request.expected, version)
        except TidingsError as exc:
            plan.outcomes.append(exc)
            continue
        if not request.events:
            plan.outcomes.append(AppendResult(version, last))
            continue
        events = plan.events
        for event in request.events:
            version += 1
            offset = len(events) + 1
            events.append(PlannedEvent(offset, stream_id, version, event, request.metadata))
            if request.explicit_ids:
                known[event.event_id] = StoredId(stream_id, version, -offset)
        current[stream_id] = (version, -len(events))
        plan.outcomes.append(AppendResult(version, -len(events)))
    return plan


def _original_result(request: AppendRequest, stored: Mapping[uuid.UUID, StoredId]) -> AppendResult | None:
    """The original result if ``request`` is an exact retry; None if none of its ids is stored;
    raise :class:`DuplicateEventId` if some are stored and it is not an exact retry."""
    found = [stored.get(e.event_id) for e in request.events]
    if all(where is None for where in found):
        return None
    first = found[0]
    if first is not None and first.stream_id == request.stream_id:
        retry = all(
            where is not None and where.stream_id == request.stream_id and where.version == first.version + i
            for i, where in enumerate(found)
        )
        expected_ok = not isinstance(request.expected, int) or request.expected == first.version - 1
        if retry and expected_ok:
            last = found[-1]
            assert last is not None
            return AppendResult(last.version, last.position)
    for event, where in zip(request.events, found, strict=True):
        if where is not None:
            raise DuplicateEventId(
                event.event_id,
                request.stream_id,
                f"it is already stored in stream {where.stream_id!r} at version {where.version}, and "
                "this append is not an exact retry of the one that stored it",
            )
    raise AssertionError("unreachable: a stored id was found above")


MAX_STREAM_ID_LENGTH: Final = 512
"""Longest accepted stream id, in characters."""


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
    if not stream_id.isascii():
        # A lone surrogate ("a\ud800") is a valid str but no database can store it; found only
        # when the append is written, it would fail the writes batched with it.
        try:
            stream_id.encode()
        except UnicodeEncodeError:
            raise InvalidStreamId(stream_id, "cannot be encoded as UTF-8 (a lone surrogate)") from None
    return stream_id


def validate_expected(stream_id: str, expected: object) -> ExpectedVersion:
    if isinstance(expected, StreamState):
        return expected
    if isinstance(expected, int) and not isinstance(expected, bool) and 0 <= expected <= 2**63 - 1:
        return expected
    raise InvalidArgument(
        f"stream {stream_id!r}: expected_version must be ANY, NO_STREAM, STREAM_EXISTS or an "
        f"int from 0 to 2**63 - 1, got {expected!r:.80}"
    )


_new_object = object.__new__
_set_attribute = object.__setattr__
_from_bytes = int.from_bytes
# Looked up once: reading an enum member is a descriptor call (~0.25 us), once per id otherwise.
_SAFE_UNKNOWN: Final = uuid.SafeUUID.unknown


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
        _set_attribute(result, "is_safe", _SAFE_UNKNOWN)
        out.append(result)
    return out
