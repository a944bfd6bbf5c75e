"""Typed events, the recorded envelope, the type registry and upcasting.

An :class:`Event` is a frozen pydantic model. Its stored *type name* is the class name unless the
class sets ``__event_type__``; its *schema version* is 1 unless it sets ``__event_version__``.
Defining a subclass registers it in the default :class:`EventRegistry`, which is what stores use to
turn stored rows back into typed events.

Schema evolution: when a class moves from schema version N to N+1, register an upcaster for
``(type, N)`` that turns the old data dict into the new shape. Reading applies the chain of
upcasters in order, so an event stored at version 1 comes back as the version-3 class.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from operator import attrgetter
from typing import TYPE_CHECKING, Any, ClassVar, Final, TypeVar
from uuid import UUID, SafeUUID

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from tidings.errors import (
    CorruptEvent,
    DuplicateEventType,
    EventTypeError,
    InvalidArgument,
    SerializationError,
    UnknownEventType,
    UpcastError,
)

__all__ = [
    "Event",
    "EventRegistry",
    "RawEvent",
    "RecordedEvent",
    "Upcaster",
    "default_registry",
    "upcaster",
]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the data dict of schema version N into the data dict of version N+1."""

E = TypeVar("E", bound="Event")


class Event(BaseModel):
    """Base class of typed events: immutable, validated, JSON-serialisable.

    Name events in the past tense (``OrderPlaced``). Subclasses are registered on definition in
    :data:`default_registry`; set ``__event_type__`` to decouple the stored name from the class name
    (and so survive renames), and raise ``__event_version__`` when the schema changes.
    """

    # NaN and infinities are written as the bare tokens NaN/Infinity (not JSON) instead of a silent
    # null, so that the registry's encode can see and refuse them: null would store an event whose
    # float field no longer validates, and the stream could never be read again.
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    __event_type__: ClassVar[str]
    __event_version__: ClassVar[int] = 1
    __event_register__: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Only a class's own __event_type__ counts: a subclass must not inherit its parent's name.
        if "__event_type__" not in cls.__dict__:
            cls.__event_type__ = cls.__name__
        name = cls.__event_type__
        if not isinstance(name, str) or not name or "\x00" in name or len(name) > 200:
            raise EventTypeError(
                f"{cls.__qualname__}.__event_type__ must be a non-empty str of at most 200 "
                f"characters without NUL, got {name!r:.80}"
            )
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise EventTypeError(
                f"{cls.__qualname__}.__event_type__ {name!r:.80} is not valid Unicode text"
            ) from None
        version = cls.__dict__.get("__event_version__", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise EventTypeError(f"{cls.__qualname__}.__event_version__ must be an int >= 1")
        cls.__event_version__ = version

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        # Registration waits until pydantic has built the model (its validators exist now).
        super().__pydantic_init_subclass__(**kwargs)
        if cls.__dict__.get("__event_register__", True):
            default_registry.register(cls)


@dataclasses.dataclass(frozen=True, slots=True)
class RawEvent:
    """A stored event read without decoding: its type name, schema version and data dict.

    Returned in place of a typed event for unknown types when reading with ``raw_unknown=True``.
    """

    event_type: str
    schema_version: int
    data: dict[str, Any]


class RecordedEvent:
    """An event as the store returns it: the typed event in its envelope. Immutable.

    ``version`` is the event's place in its stream (the first is 1); ``position`` its place in the
    store's global log (the first is 1, strictly increasing, never skipped by a reader).
    ``metadata`` holds the standard keys ``correlation_id``, ``causation_id`` and ``user_id`` when
    set. ``event_id`` and ``timestamp`` are built from their stored form on first access: most
    consumers of a long scan never look at them, and building them was a third of decoding.

    Its fields are read-only properties over private slots: a read of the log builds one per
    event, and plain slot stores in ``__init__`` cost a fifth of going through
    ``object.__setattr__`` past a ``__setattr__`` that refuses writes.
    """

    __slots__ = (
        "_event",
        "_event_id",
        "_event_type",
        "_metadata",
        "_position",
        "_schema_version",
        "_stream_id",
        "_timestamp",
        "_version",
    )

    _event_id: UUID | bytes
    _timestamp: datetime | int

    def __init__(
        self,
        event_id: UUID | bytes,
        event_type: str,
        stream_id: str,
        version: int,
        position: int,
        timestamp: datetime | int,
        event: Event | RawEvent,
        metadata: Mapping[str, Any],
        schema_version: int = 1,
    ) -> None:
        self._event_id = event_id
        self._event_type = event_type
        self._stream_id = stream_id
        self._version = version
        self._position = position
        self._timestamp = timestamp
        self._event = event
        self._metadata = metadata
        self._schema_version = schema_version

    if TYPE_CHECKING:

        @property
        def event_type(self) -> str: ...
        @property
        def stream_id(self) -> str: ...
        @property
        def version(self) -> int: ...
        @property
        def position(self) -> int: ...
        @property
        def event(self) -> Event | RawEvent: ...
        @property
        def metadata(self) -> Mapping[str, Any]: ...
        @property
        def schema_version(self) -> int: ...

    else:
        # attrgetter properties: read-only, and read in C (no Python frame per access).
        event_type = property(attrgetter("_event_type"), doc="The stored type name.")
        stream_id = property(attrgetter("_stream_id"), doc="The stream (aggregate id).")
        version = property(attrgetter("_version"), doc="The event's place in its stream (from 1).")
        position = property(attrgetter("_position"), doc="The event's place in the global log (from 1).")
        event = property(attrgetter("_event"), doc="The typed event (a RawEvent for unknown types).")
        metadata = property(attrgetter("_metadata"), doc="The append's metadata.")
        schema_version = property(attrgetter("_schema_version"), doc="The stored schema version.")

    @property
    def event_id(self) -> UUID:
        """The event's unique id."""
        value = self._event_id
        if not isinstance(value, UUID):
            value = uuid_from_bytes(value)
            self._event_id = value
        return value

    @property
    def timestamp(self) -> datetime:
        """When the event was stored (aware, UTC)."""
        value = self._timestamp
        if not isinstance(value, datetime):
            value = datetime_from_micros(value)
            self._timestamp = value
        return value

    @property
    def correlation_id(self) -> str | None:
        value = self.metadata.get("correlation_id")
        return None if value is None else str(value)

    @property
    def causation_id(self) -> str | None:
        value = self.metadata.get("causation_id")
        return None if value is None else str(value)

    def _key(self) -> tuple[Any, ...]:
        return (
            self.event_id,
            self.event_type,
            self.stream_id,
            self.version,
            self.position,
            self.timestamp,
            self.event,
            dict(self.metadata),
            self.schema_version,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecordedEvent):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash((self.event_id, self.position))

    def __repr__(self) -> str:
        return (
            f"RecordedEvent(event_id={self.event_id!s}, event_type={self.event_type!r}, "
            f"stream_id={self.stream_id!r}, version={self.version}, position={self.position}, "
            f"timestamp={self.timestamp.isoformat()}, event={self.event!r})"
        )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_new_object = object.__new__
_set_attribute = object.__setattr__
_from_bytes = int.from_bytes
_SAFE_UNKNOWN: Final = SafeUUID.unknown  # an enum member read is a descriptor call: once, here


def uuid_from_bytes(value: Any) -> UUID:
    """A UUID from its 16 stored bytes (or any form ``uuid.UUID`` accepts)."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, bytes) and len(value) == 16:
        # The UUID constructor validates its many input forms and costs ~2 us; stored ids are
        # exactly 16 bytes, so build the immutable object directly (what UUID.__init__ ends with).
        result = _new_object(UUID)
        _set_attribute(result, "int", _from_bytes(value))
        _set_attribute(result, "is_safe", _SAFE_UNKNOWN)
        return result
    if isinstance(value, bytearray | memoryview):
        return UUID(bytes=bytes(value))
    return UUID(str(value))


@functools.lru_cache(maxsize=64)
def _micros_to_datetime(value: int) -> datetime:
    # Events appended together share a timestamp: a small cache spares most conversions.
    return _EPOCH + timedelta(microseconds=value)


def datetime_from_micros(value: Any) -> datetime:
    """An aware UTC datetime from stored integer microseconds since the epoch (or a datetime)."""
    if isinstance(value, datetime):
        return value
    return _micros_to_datetime(value)


class EventRegistry:
    """Maps stored type names to event classes, and holds the upcaster chains.

    Encoding and decoding live here so that every backend stores exactly the same bytes.
    """

    def __init__(self) -> None:
        self._types: dict[str, type[Event]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        # (type name, current schema version) -> the model's JSON validator: the hot read path.
        self.validators: dict[tuple[str, int], Callable[[bytes | str], Any]] = {}

    def register(self, cls: type[Event]) -> None:
        """Register ``cls`` under its type name.

        Re-registering a class with the same module and qualified name replaces it (a reloaded
        module); a *different* class claiming the name raises :class:`DuplicateEventType`.
        """
        name = cls.__event_type__
        existing = self._types.get(name)
        if existing is not None and existing is not cls:
            same = (existing.__module__, existing.__qualname__) == (
                cls.__module__,
                cls.__qualname__,
            )
            if not same:
                raise DuplicateEventType(name, existing, cls)
        if existing is not None:
            self.validators.pop((name, existing.__event_version__), None)
        self._types[name] = cls
        self.validators[(name, cls.__event_version__)] = cls.__pydantic_validator__.validate_json

    def get(self, event_type: str) -> type[Event] | None:
        return self._types.get(event_type)

    def __contains__(self, event_type: str) -> bool:
        return event_type in self._types

    def types(self) -> dict[str, type[Event]]:
        return dict(self._types)

    def add_upcaster(self, event_type: str, from_version: int, fn: Upcaster) -> None:
        """Register ``fn`` to turn ``event_type`` data of ``from_version`` into ``from_version + 1``."""
        if not isinstance(event_type, str) or not event_type:
            raise EventTypeError(
                f"upcaster: event_type must be a type name or Event class, got {event_type!r}"
            )
        if not isinstance(from_version, int) or isinstance(from_version, bool) or from_version < 1:
            raise EventTypeError(f"upcaster for {event_type!r}: from_version must be an int >= 1")
        if not callable(fn):
            raise EventTypeError(f"upcaster for {event_type!r}: {fn!r} is not callable")
        key = (event_type, from_version)
        if key in self._upcasters and self._upcasters[key] is not fn:
            raise EventTypeError(
                f"an upcaster for {event_type!r} from schema version {from_version} already exists"
            )
        self._upcasters[key] = fn

    # -- encoding -----------------------------------------------------------------------------

    @staticmethod
    def encode(event: Event) -> bytes:
        """The JSON bytes stored for ``event``; raises :class:`SerializationError`.

        A float that is NaN or infinite anywhere in the event is refused (JSON has no such value;
        storing it as null would make the event unreadable), naming the field.
        """
        if not isinstance(event, Event):
            raise SerializationError(f"expected a tidings.Event instance, got {type(event).__qualname__}")
        try:
            data = event.__pydantic_serializer__.to_json(event)
        except Exception as exc:  # pydantic raises several types here; all mean the same
            raise SerializationError(
                f"event {type(event).__qualname__} cannot be serialised to JSON: {exc}"
            ) from exc
        # Cheap byte scans on the hot path; the full parse runs only when a NaN/Infinity token may
        # be there, or when the data may nest deeper than a reader can parse.
        # find(), not ``in``: bytes.__contains__ first tries the needle as an int and pays for
        # the TypeError it clears, which made this scan cost more than the serialisation.
        suspect = data.find(b"NaN") >= 0 or data.find(b"Infinity") >= 0
        deep = len(data) > 2 * _MAX_DEPTH and data.count(b"[") + data.count(b"{") > _MAX_DEPTH
        if (suspect or deep) and not _is_json(data):
            where = _non_finite_path(event.model_dump(mode="python"))
            problem = (
                "nests deeper than JSON readers accept (1024 levels)"
                if where is None
                else f"{where} is NaN or infinite, which JSON cannot represent"
            )
            raise SerializationError(
                f"event {type(event).__qualname__} ({event.__event_type__!r}) cannot be stored: {problem}"
            )
        return data

    @staticmethod
    def encode_metadata(metadata: Mapping[str, Any] | None) -> bytes | None:
        """The JSON bytes stored for an append's metadata (None when empty); raises
        :class:`SerializationError` for values JSON cannot hold (NaN, infinities, text with lone
        surrogates, non-str keys, unknown types) and :class:`InvalidArgument` for a non-mapping."""
        if metadata is None:
            return None
        if not isinstance(metadata, Mapping):
            raise InvalidArgument(f"metadata must be a mapping, got {type(metadata).__qualname__}")
        if not metadata:
            return None
        try:
            data = orjson.dumps(metadata, default=_json_default)
        except TypeError as exc:
            raise SerializationError(f"metadata cannot be serialised to JSON: {exc}") from exc
        # orjson writes NaN and infinities as null: look for them only when a null was written.
        if b"null" in data:
            where = _non_finite_path(metadata, "metadata")
            if where is not None:
                raise SerializationError(
                    f"metadata cannot be stored: {where} is NaN or infinite, which JSON cannot represent"
                )
        return data

    # -- decoding -----------------------------------------------------------------------------

    def decode(
        self,
        event_type: str,
        schema_version: int,
        data: bytes | str,
        *,
        raw_unknown: bool = False,
        stream_id: str | None = None,
        position: int | None = None,
        version: int | None = None,
    ) -> Event | RawEvent:
        """Turn stored data back into a typed event, upcasting older schema versions.

        Raises :class:`UnknownEventType` for unregistered types unless ``raw_unknown`` is true,
        in which case a :class:`RawEvent` is returned. Stored data that is not JSON, or that does
        not validate as the class, raises :class:`~tidings.errors.CorruptEvent` naming the
        stream, version, position and type.
        """
        cls = self._types.get(event_type)
        try:
            if cls is None:
                if raw_unknown:
                    return RawEvent(event_type, schema_version, _json_object(data))
                raise UnknownEventType(event_type, stream_id=stream_id, position=position)
            target = cls.__event_version__
            if schema_version == target:
                try:
                    return cls.model_validate_json(data)
                except ValidationError as exc:
                    # pydantic's JSON parser stops at 200 levels of nesting; what encode accepted
                    # (up to 1024) must read back, so parse deep data with orjson instead.
                    if "recursion limit" not in str(exc):
                        raise
                    return cls.model_validate(_json_object(data))
            if schema_version > target:
                raise UpcastError(
                    event_type,
                    schema_version,
                    target,
                    "the stored schema version is newer than the class; deploy the newer code",
                )
            return cls.model_validate(self.upcast(event_type, schema_version, target, data))
        except UpcastError as exc:
            if stream_id is None:
                raise
            raise UpcastError(
                event_type,
                exc.from_version,
                exc.to_version,
                f"{exc.detail} (stream {stream_id!r}, version {version}, position {position})",
            ) from exc
        except (ValidationError, orjson.JSONDecodeError, _NotAnObject) as exc:
            if isinstance(exc, ValidationError):
                assert cls is not None
                detail = (
                    f"it does not validate as {cls.__module__}.{cls.__qualname__} (if the class "
                    "changed, raise its __event_version__ and register an upcaster): "
                    f"{exc}"
                )
            else:
                detail = f"its data is not a JSON object: {exc}"
            raise CorruptEvent(
                detail,
                event_type=event_type,
                schema_version=schema_version,
                stream_id=stream_id,
                version=version,
                position=position,
            ) from exc

    def upcast(
        self, event_type: str, from_version: int, to_version: int, data: bytes | str
    ) -> dict[str, Any]:
        value = _json_object(data)
        for version in range(from_version, to_version):
            fn = self._upcasters.get((event_type, version))
            if fn is None:
                raise UpcastError(event_type, from_version, to_version, f"no upcaster from version {version}")
            try:
                value = fn(value)
            except Exception as exc:
                raise UpcastError(event_type, version, version + 1, f"the upcaster raised {exc!r}") from exc
            if not isinstance(value, dict):
                raise UpcastError(event_type, version, version + 1, "the upcaster did not return a dict")
        return value


class _NotAnObject(ValueError):
    """Stored event data parsed as JSON but is not an object."""


def _json_object(data: bytes | str) -> dict[str, Any]:
    value = orjson.loads(data)
    if not isinstance(value, dict):
        raise _NotAnObject(f"found {type(value).__name__}")
    return value


_MAX_DEPTH: Final = 200
"""Nesting beyond which encode makes sure the data still parses (orjson reads up to 1024 levels)."""


def _is_json(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def _non_finite_path(value: Any, path: str = "") -> str | None:
    """The path (``field.key[2]``) of the first NaN or infinite float in ``value``, or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "the value")
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _non_finite_path(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list | tuple | set | frozenset):
        for index, item in enumerate(value):
            found = _non_finite_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _json_default(value: Any) -> Any:
    # Metadata commonly carries ids and instants; anything else is the caller's to convert.
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__qualname__} is not JSON serialisable")


default_registry = EventRegistry()
"""The registry every :class:`Event` subclass joins on definition, used by stores by default."""


def upcaster(
    event_type: str | type[Event], from_version: int, *, registry: EventRegistry | None = None
) -> Callable[[Upcaster], Upcaster]:
    """Decorator: register a function that upcasts ``event_type`` data from ``from_version``.

    >>> @upcaster("AccountOpened", from_version=1)
    ... def _add_currency(data: dict) -> dict:
    ...     return {**data, "currency": "EUR"}
    """
    if isinstance(event_type, type) and issubclass(event_type, Event):
        name = event_type.__event_type__
    elif isinstance(event_type, str):
        name = event_type
    else:
        raise EventTypeError(f"upcaster: event_type must be a type name or Event class, got {event_type!r}")
    target = registry if registry is not None else default_registry

    def decorate(fn: Upcaster) -> Upcaster:
        target.add_upcaster(name, from_version, fn)
        return fn

    return decorate
