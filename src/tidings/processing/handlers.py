"""Event handlers: functions and classes that react to events, and how they are dispatched.

A handler is ``async def handler(event, ctx)`` (or ``(event)``), where ``event`` is the typed
event and ``ctx`` a :class:`~tidings.processing.context.HandlerContext`. Effects that go through
``ctx`` -- aggregates saved with ``ctx.save``, events emitted with ``ctx.emit``, SQL with
``ctx.execute`` -- commit in the same transaction as the subscription's checkpoint: they happen
exactly once. Effects elsewhere (an e-mail, an HTTP call) happen once per delivery attempt; use
the event id as the idempotency key there, or an inbox in that other database.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, get_type_hints

from tidings import tracing
from tidings.errors import InvalidArgument
from tidings.events import Event
from tidings.processing.context import HandlerContext

__all__ = ["EventHandler", "HandlerFunction", "handler_methods"]

HandlerFunction = Callable[..., Awaitable[None] | None]


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


async def call_handler(fn: HandlerFunction, event: Event, ctx: HandlerContext, *, span: bool = True) -> None:
    """Call ``fn`` with ``(event, ctx)`` or ``(event)``, awaiting it if it is a coroutine function,
    in a ``tidings.handle`` span (see :mod:`tidings.tracing`) unless ``span`` is false (a wrapper
    calling the handler it wraps: the wrapper's call has the span).

    Names ``fn`` in ``ctx.caused_by`` first, so that what it emits records who emitted it."""
    ctx.caused_by = handler_label(ctx.group, fn)
    takes_ctx = _arity(fn) >= 2
    if not span:
        result = fn(event, ctx) if takes_ctx else fn(event)
        if inspect.isawaitable(result):
            await result
        return
    with tracing.handle_span(ctx.recorded, ctx.group, ctx.attempt):
        result = fn(event, ctx) if takes_ctx else fn(event)
        if inspect.isawaitable(result):
            await result


def handler_label(group: str, fn: Callable[..., Any]) -> str:
    """``handler:<group>.<function>``; just ``handler:<group>`` when the group is named after the
    function (``<service>.<function>``, the default)."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    if group == name or group.endswith(f".{name}"):
        return f"handler:{group}"
    return f"handler:{group}.{name}"


@functools.lru_cache(maxsize=1024)
def _arity(fn: Callable[..., Any]) -> int:
    # inspect.signature costs tens of microseconds; handlers are few and called per event.
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return len(params)
