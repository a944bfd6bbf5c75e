"""Event-sourced aggregates: state is the fold of the aggregate's events.

Write commands as methods that check invariants and call :meth:`Aggregate.record`; change state
only in :meth:`Aggregate.apply`, with structural pattern matching::

    class Account(Aggregate):
        balance: int = 0

        def deposit(self, amount: int) -> None:
            if amount <= 0:
                raise ValueError("amount must be positive")
            self.record(Deposited(amount=amount))

        def apply(self, event: Event) -> None:
            match event:
                case Deposited(amount=a):
                    self.balance += a

Annotated class attributes are the aggregate's state: their defaults are copied into each new
instance, and they are what snapshots store and restore (validated by pydantic).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from typing import Any, ClassVar, Self, cast, get_origin, get_type_hints

import orjson
from pydantic import BaseModel, ValidationError, create_model

from tidings.errors import InvalidArgument, InvalidStreamId, SnapshotError, UnknownEventType
from tidings.events import Event, RecordedEvent

__all__ = ["Aggregate"]

_INTERNAL = frozenset({"id", "version", "_pending"})
_IMMUTABLE = (int, float, str, bytes, bool, type(None), frozenset)


class Aggregate:
    """Base class of event-sourced aggregates.

    ``Aggregate(id)`` is an empty aggregate at version 0. ``version`` counts every event applied,
    recorded or loaded, saved or not; ``pending_events`` are those recorded since the last save.
    Subclasses may set ``__aggregate_type__`` (defaults to the class name) and
    ``__snapshot_version__`` (raise it to invalidate old snapshots by hand).
    """

    __aggregate_type__: ClassVar[str]
    __snapshot_version__: ClassVar[int] = 1
    _state_model: ClassVar[type[BaseModel] | None] = None
    _state_schema: ClassVar[str | None] = None

    id: str
    version: int

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__aggregate_type__" not in cls.__dict__:
            cls.__aggregate_type__ = cls.__name__
        cls._state_model = None
        cls._state_schema = None

    def __init__(self, id: str) -> None:
        if not isinstance(id, str) or not id:
            raise InvalidStreamId(id, f"a {type(self).__name__} id must be a non-empty str (its stream id)")
        self.id = id
        self.version = 0
        self._pending: list[Event] = []
        for name, value in self._state_defaults().items():
            # Immutable defaults are shared safely; only containers need their own copy.
            setattr(self, name, value if isinstance(value, _IMMUTABLE) else copy.deepcopy(value))

    @classmethod
    def _state_fields(cls) -> dict[str, Any]:
        cached = cls.__dict__.get("_state_fields_cache")
        if cached is not None:
            return cast(dict[str, Any], cached)
        hints = get_type_hints(cls)
        fields = {
            name: hint
            for name, hint in hints.items()
            if name not in _INTERNAL
            and not name.startswith("_")
            and get_origin(hint) is not ClassVar
            and hint is not ClassVar
        }
        cls._state_fields_cache = fields  # type: ignore[attr-defined]
        return fields

    @classmethod
    def _state_defaults(cls) -> dict[str, Any]:
        cached = cls.__dict__.get("_state_defaults_cache")
        if cached is not None:
            return cast(dict[str, Any], cached)
        out: dict[str, Any] = {}
        for name in cls._state_fields():
            for klass in cls.__mro__:
                if name in klass.__dict__:
                    out[name] = klass.__dict__[name]
                    break
        cls._state_defaults_cache = out  # type: ignore[attr-defined]
        return out

    # -- commands -------------------------------------------------------------------------------

    def record(self, event: Event) -> None:
        """Apply ``event`` now and queue it to be saved. The only way commands change state."""
        if not isinstance(event, Event):
            raise InvalidArgument(f"record() takes a tidings.Event, got {type(event).__qualname__}")
        self.apply(event)
        self.version += 1
        self._pending.append(event)

    def apply(self, event: Event) -> None:
        """Change state for ``event``. Override with a ``match`` over your event classes.

        Must be deterministic and free of side effects: it runs again on every load.
        """

    @property
    def pending_events(self) -> list[Event]:
        """Events recorded since the aggregate was loaded or last saved (a copy)."""
        return list(self._pending)

    def mark_saved(self) -> list[Event]:
        """Clear and return the pending events; called by the repository after a successful save."""
        pending, self._pending = self._pending, []
        return pending

    # -- replay ---------------------------------------------------------------------------------

    def replay(self, events: Iterable[RecordedEvent | Event]) -> Self:
        """Apply already-stored events (no queuing); returns ``self``."""
        if isinstance(events, Event | RecordedEvent | str | bytes) or not isinstance(events, Iterable):
            raise InvalidArgument(f"replay() takes an iterable of events, got {type(events).__qualname__}")
        apply = self.apply
        for item in events:
            if isinstance(item, RecordedEvent):
                event = item.event
                if not isinstance(event, Event):
                    raise UnknownEventType(item.event_type, stream_id=item.stream_id, position=item.position)
                apply(event)
                self.version = item.version
            elif isinstance(item, Event):
                apply(item)
                self.version += 1
            else:
                raise InvalidArgument(
                    f"replay() takes events or recorded events, got {type(item).__qualname__}"
                )
        return self

    # -- snapshots ------------------------------------------------------------------------------

    @classmethod
    def _snapshot_model(cls) -> tuple[type[BaseModel], str]:
        if cls._state_model is None or cls._state_schema is None:
            fields: dict[str, Any] = {name: (hint, ...) for name, hint in cls._state_fields().items()}
            model = create_model(f"{cls.__name__}State", **fields)
            schema = orjson.dumps(
                {"v": cls.__snapshot_version__, "schema": model.model_json_schema()},
                option=orjson.OPT_SORT_KEYS,
            )
            cls._state_model = model
            cls._state_schema = hashlib.sha256(schema).hexdigest()[:32]
        return cls._state_model, cls._state_schema

    @classmethod
    def snapshot_schema(cls) -> str:
        """A fingerprint of the state's fields and types; snapshots with another one are ignored."""
        return cls._snapshot_model()[1]

    def snapshot_state(self) -> bytes:
        """Serialise the annotated state to JSON; raises :class:`SnapshotError` if it cannot."""
        model, _ = self._snapshot_model()
        fields = model.model_fields
        unknown = sorted(
            k for k in vars(self) if k not in _INTERNAL and k not in fields and not k.startswith("_")
        )
        if unknown:
            raise SnapshotError(
                f"{type(self).__name__} cannot be snapshotted: attribute(s) {', '.join(unknown)} "
                "have no class annotation, so their type is unknown; annotate them"
            )
        try:
            state = model.model_validate({name: getattr(self, name) for name in fields})
            return state.model_dump_json().encode()
        except (ValidationError, ValueError, TypeError) as exc:
            raise SnapshotError(f"{type(self).__name__} state cannot be serialised: {exc}") from exc

    @classmethod
    def from_snapshot(cls, id: str, version: int, state: bytes) -> Self | None:
        """Rebuild an aggregate from snapshot bytes, or None if they do not validate."""
        model, _ = cls._snapshot_model()
        try:
            values = model.model_validate_json(state)
        except ValidationError:
            return None
        self = cls.__new__(cls)
        self.id = id
        self.version = version
        self._pending = []
        for name in model.model_fields:
            setattr(self, name, getattr(values, name))
        return self

    def __repr__(self) -> str:
        return f"<{type(self).__name__} id={self.id!r} version={self.version}>"
