"""Event handlers: functions and classes that react to events, and the context they get.

A handler is ``async def handler(event, ctx)`` (or ``(event)``), where ``event`` is the typed
event and ``ctx`` a :class:`HandlerContext`. Effects that go through ``ctx`` — events emitted with
:meth:`HandlerContext.emit` and SQL with :meth:`HandlerContext.execute` — commit in the same
transaction as the subscription's checkpoint and its inbox record: they happen exactly once.
Effects elsewhere (an e-mail, an HTTP call) happen at least once; use the event id as the
idempotency key there, or an :class:`~tidings.processing.inbox.Inbox` in that other database.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar, get_type_hints

from tidings.errors import InvalidArgument
from tidings.events import Event, RecordedEvent
from tidings.store.append import ANY, AppendRequest, ExpectedVersion
from tidings.store.base import EventStore

__all__ = ["EventHandler", "HandlerContext", "HandlerFunction", "handler_methods"]

HandlerFunction = Callable[..., Awaitable[None] | None]


class HandlerContext:
    """What a handler gets beside its event: the envelope, and effects that commit exactly once."""

    def __init__(self, store: EventStore, recorded: RecordedEvent, group: str, attempt: int) -> None:
        self.store = store
        self.recorded = recorded
        self.group = group
        self.attempt = attempt
        self.appends: list[AppendRequest] = []
        self.statements: list[tuple[str, Sequence[Any] | Mapping[str, Any]]] = []

    def emit(
        self,
        stream_id: str,
        events: Iterable[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Append ``events`` to ``stream_id`` when this event's processing commits.

        The new events' metadata carries ``causation_id`` = the handled event's id and the handled
        event's ``correlation_id`` (or its id, if it started the conversation). Their event ids are
        derived from the handled event's id, so a redelivery can never append them twice.
        """
        recorded = self.recorded
        meta = {
            "correlation_id": recorded.correlation_id or str(recorded.event_id),
            "causation_id": str(recorded.event_id),
            **({"user_id": recorded.metadata["user_id"]} if "user_id" in recorded.metadata else {}),
            **(metadata or {}),
        }
        event_list = list(events)
        ids = [_derived_id(recorded, self.group, len(self.appends), i) for i in range(len(event_list))]
        self.appends.append(
            self.store.prepare_append(
                stream_id, event_list, expected_version=expected_version, metadata=meta, event_ids=ids
            )
        )

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> None:
        """Run a write statement in the commit of this event's processing.

        ``params`` is a sequence for ``?`` placeholders or a mapping for named ones (``:name``
        on SQLite); it is copied now, so later changes to it do not leak into the statement.
        """
        if isinstance(params, Mapping):
            self.statements.append((sql, dict(params)))
        elif isinstance(params, Sequence) and not isinstance(params, str | bytes):
            self.statements.append((sql, tuple(params)))
        else:
            raise InvalidArgument(f"execute() params must be a sequence or a mapping, got {params!r:.60}")


def _derived_id(recorded: RecordedEvent, group: str, call: int, index: int) -> uuid.UUID:
    return uuid.uuid5(recorded.event_id, f"{group}/{call}/{index}")


class EventHandler:
    """A class of handlers dispatched by event type.

    Every method whose first parameter is annotated with an :class:`Event` subclass handles that
    type (and its subclasses)::

        class InventoryEventHandler(EventHandler):
            group = "inventory"

            async def reserve(self, event: OrderPlaced, ctx: HandlerContext) -> None: ...
            async def release(self, event: OrderCancelled, ctx: HandlerContext) -> None: ...
    """

    group: ClassVar[str | None] = None
    stream_prefix: ClassVar[str | None] = None


def handler_methods(obj: object) -> dict[type[Event], HandlerFunction]:
    """The event-type -> bound method table of a handler or projection instance."""
    table: dict[type[Event], HandlerFunction] = {}
    for name, member in inspect.getmembers(type(obj), inspect.isfunction):
        if name.startswith("_"):
            continue
        params = list(inspect.signature(member).parameters)
        if len(params) < 2:
            continue
        try:
            hints = get_type_hints(member)
        except Exception as exc:  # an annotation that cannot be resolved is a declaration bug
            raise InvalidArgument(f"cannot resolve annotations of {member.__qualname__}: {exc}") from exc
        hint = hints.get(params[1])
        if isinstance(hint, type) and issubclass(hint, Event):
            if hint in table:
                raise InvalidArgument(f"{type(obj).__qualname__} has two handlers for {hint.__qualname__}")
            table[hint] = getattr(obj, name)
    return table


@dataclasses.dataclass(frozen=True, slots=True)
class Dispatch:
    """Maps event classes to handler callables and knows how to call them."""

    table: Mapping[type[Event], HandlerFunction]

    @property
    def type_names(self) -> tuple[str, ...]:
        names = {cls.__event_type__ for cls in self.table}
        for cls in self.table:  # subclasses are handled too, and stored under their own name
            names.update(sub.__event_type__ for sub in _subclasses(cls))
        return tuple(sorted(names))

    cache: dict[type, HandlerFunction | None] = dataclasses.field(default_factory=dict)

    def find(self, event: object) -> HandlerFunction | None:
        """The handler for ``event``'s class or its nearest base class, or None."""
        kind = type(event)
        try:
            return self.cache[kind]
        except KeyError:
            pass
        found: HandlerFunction | None = None
        for cls in kind.__mro__:
            fn = self.table.get(cls)
            if fn is not None:
                found = fn
                break
        self.cache[kind] = found
        return found


def _subclasses(cls: type[Event]) -> list[type[Event]]:
    out: list[type[Event]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_subclasses(sub))
    return out


async def call_handler(fn: HandlerFunction, event: Event, ctx: HandlerContext) -> None:
    """Call ``fn`` with ``(event, ctx)`` or ``(event)``, awaiting it if it is a coroutine function."""
    takes_ctx = _arity(fn) >= 2
    result = fn(event, ctx) if takes_ctx else fn(event)
    if inspect.isawaitable(result):
        await result


@functools.lru_cache(maxsize=1024)
def _arity(fn: Callable[..., Any]) -> int:
    # inspect.signature costs tens of microseconds; handlers are few and called per event.
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(params)
