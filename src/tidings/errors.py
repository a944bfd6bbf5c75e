"""The exceptions tidings raises.

Every error the library raises on purpose is a :class:`TidingsError`. Subclasses carry the facts
(stream id, versions, event type, position) as attributes, and their messages name them, so a log
line is enough to know what went wrong. Errors from drivers (sqlite3, psycopg, nats) are translated
into this family and chained (``raise ... from exc``), never leaked raw.

An operation that raises one of these errors has changed nothing.

Every error also says whether trying again can help, which is what the subscription runners act on:

* :attr:`TidingsError.transient` -- the failure is in the surroundings (the database is locked, a
  connection dropped, a pool timed out, the server restarts): wait and try the same thing again.
  Runners back off without spending a message's attempts. Only :class:`StoreUnavailable` is transient.
* :attr:`TidingsError.permanent` -- the same call can never succeed (an invalid argument, a value that
  cannot be serialised, SQL that does not parse or names an unknown table): a message that fails this
  way is dead-lettered at its first attempt.
* neither -- the failure may depend on state (a concurrency conflict, a constraint violation, a
  handler's own exception): retried per the subscription's :class:`~tidings.RetryPolicy`, then
  dead-lettered.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID


class TidingsError(Exception):
    """Root of every error raised by tidings."""

    transient: bool = False
    """True if the same operation may succeed later unchanged (an outage): wait, don't give up."""

    permanent: bool = False
    """True if the same operation can never succeed: retrying it is pointless."""


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` is a failure of the surroundings that waiting may cure (an outage)."""
    return isinstance(exc, TidingsError) and exc.transient


def is_permanent(exc: BaseException) -> bool:
    """True if ``exc`` says the same operation can never succeed, so retrying it is pointless."""
    return isinstance(exc, TidingsError) and exc.permanent


class InvalidArgument(TidingsError, ValueError):
    """A caller passed a value the operation cannot accept (a negative ``after``, an empty stream id)."""

    permanent = True


class InvalidStreamId(InvalidArgument):
    """A stream id is not a non-empty string of bounded length."""

    def __init__(self, stream_id: object, reason: str) -> None:
        shown = repr(stream_id)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"invalid stream id {shown}: {reason}")
        self.reason = reason


class ConcurrencyError(TidingsError):
    """An append's ``expected_version`` did not match the stream's actual version.

    Nothing of that append was written. ``expected`` is what the caller passed (an int or one of
    ``ANY``/``NO_STREAM``/``STREAM_EXISTS``); ``actual`` is the stream's version when the append ran.
    """

    def __init__(self, stream_id: str, expected: object, actual: int) -> None:
        super().__init__(
            f"stream {stream_id!r}: expected version {expected}, but the stream is at version {actual}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class DuplicateEventId(TidingsError):
    """An event id is already stored, and this append is not an exact retry of the one that stored it."""

    def __init__(self, event_id: UUID, stream_id: str, detail: str) -> None:
        super().__init__(f"event id {event_id} cannot be appended to stream {stream_id!r}: {detail}")
        self.event_id = event_id
        self.stream_id = stream_id


class EventTypeError(TidingsError):
    """Problems with event classes, their registry and their schema versions."""

    permanent = True


class UnknownEventType(EventTypeError):
    """A stored event's type has no registered class (read it raw with ``raw_unknown=True``)."""

    def __init__(self, event_type: str, *, stream_id: str | None = None, position: int | None = None):
        where = ""
        if stream_id is not None:
            where = f" (stream {stream_id!r}, position {position})"
        super().__init__(
            f"no event class is registered for type {event_type!r}{where}; "
            "import the module that defines it, or read with raw_unknown=True"
        )
        self.event_type = event_type
        self.stream_id = stream_id
        self.position = position


class DuplicateEventType(EventTypeError):
    """Two different classes claim the same event type name in one registry."""

    def __init__(self, event_type: str, existing: type, new: type) -> None:
        super().__init__(
            f"event type {event_type!r} is already registered to "
            f"{existing.__module__}.{existing.__qualname__}; "
            f"{new.__module__}.{new.__qualname__} must set a different __event_type__"
        )
        self.event_type = event_type


class UpcastError(EventTypeError):
    """Stored data of an older schema version could not be brought up to the current class."""

    def __init__(self, event_type: str, from_version: int, to_version: int, detail: str) -> None:
        super().__init__(
            f"cannot upcast {event_type!r} from schema version {from_version} to {to_version}: {detail}"
        )
        self.event_type = event_type
        self.from_version = from_version
        self.to_version = to_version
        self.detail = detail


class SerializationError(TidingsError):
    """An event or its metadata could not be turned into (or back from) the stored form."""

    permanent = True


class CorruptEvent(SerializationError):
    """A stored event cannot be read back: its data is not valid JSON, or it no longer validates as
    its event class (written by an older class without an upcaster, or edited by hand).

    The message and attributes name the event: ``stream_id``, ``version``, ``position``,
    ``event_type`` and ``schema_version``. Reading the stream cannot succeed until the class accepts
    the stored data (register an upcaster, raise ``__event_version__``, relax the field) or the row
    is repaired. Permanent.
    """

    def __init__(
        self,
        detail: str,
        *,
        event_type: str,
        schema_version: int,
        stream_id: str | None = None,
        version: int | None = None,
        position: int | None = None,
    ) -> None:
        where = []
        if stream_id is not None:
            where.append(f"stream {stream_id!r}")
        if version is not None:
            where.append(f"version {version}")
        if position is not None:
            where.append(f"position {position}")
        at = f" at {', '.join(where)}" if where else ""
        super().__init__(
            f"stored event {event_type!r} (schema version {schema_version}){at} cannot be read: {detail}"
        )
        self.event_type = event_type
        self.schema_version = schema_version
        self.stream_id = stream_id
        self.version = version
        self.position = position


class StoreError(TidingsError):
    """The store itself failed: I/O, a driver error, a closed store.

    Backends raise one of the specific subclasses where they can tell: :class:`StoreUnavailable`
    (transient), :class:`StatementError` and :class:`IntegrityError` (the request was refused).
    """


class StoreUnavailable(StoreError):
    """The store cannot serve the request right now, through no fault of the request: the database
    is locked or busy, the connection was lost, no pooled connection came free in time, the server is
    starting or shutting down. Transient: wait and retry the same operation."""

    transient = True


class StatementError(StoreError):
    """The database refused a statement as written: a syntax error, an unknown table or column, a
    wrong type, a read-only database. Permanent: the same statement fails again."""

    permanent = True


class IntegrityError(StoreError):
    """A statement broke a constraint (unique, not null, foreign key, check). Not permanent: it may
    depend on data that another writer can change, so handlers get their retries."""


class StoreClosed(StoreError):
    """The store was used after ``close()``."""

    permanent = True


class CorruptStore(StoreError):
    """The database is not a tidings store (a foreign or damaged file) or has an unknown schema."""

    permanent = True


class CheckpointConflict(TidingsError):
    """Another runner of the same subscription group moved the checkpoint first; nothing was written."""

    def __init__(self, group: str, expected: int, actual: int) -> None:
        super().__init__(
            f"subscription group {group!r}: expected checkpoint {expected}, found {actual} "
            "(another runner of this group is active)"
        )
        self.group = group
        self.expected = expected
        self.actual = actual


class UnsupportedOperation(TidingsError):
    """The store lacks a capability the operation needs (e.g. projections on ``memory://``, which
    has no SQL database). The message names the backend, the capability and what needs it."""

    permanent = True


class AlreadyProcessed(TidingsError):
    """A subscription step would record, in its group's inbox, an event that is already there:
    another delivery of it committed first. Nothing was committed. For a consumer this means the
    event is done (acknowledge it), not that it failed."""

    permanent = True

    def __init__(self, group: str, event_ids: Sequence[object]) -> None:
        shown = ", ".join(str(e) for e in event_ids[:3]) + (" ..." if len(event_ids) > 3 else "")
        super().__init__(f"subscription group {group!r} has already processed {shown}; nothing was committed")
        self.group = group
        self.event_ids = list(event_ids)


class ProjectionError(TidingsError):
    """A projection is misdeclared, or its tables cannot be managed on this backend."""


class AggregateNotFound(TidingsError):
    """No events exist for the aggregate (or not at the requested version or time)."""

    def __init__(self, stream_id: str, detail: str = "no events") -> None:
        super().__init__(f"aggregate {stream_id!r} not found: {detail}")
        self.stream_id = stream_id


class SnapshotError(TidingsError):
    """An aggregate's state cannot be snapshotted (e.g. an attribute has no annotation)."""


class MissingExtra(TidingsError, ImportError):
    """An optional backend was used without its extra installed; the message names the fix."""

    def __init__(self, feature: str, extra: str, cause: Any = None) -> None:
        super().__init__(
            f"{feature} needs the {extra!r} extra: pip install 'tidings[{extra}]'"
            + (f" ({cause})" if cause else "")
        )
        self.extra = extra
