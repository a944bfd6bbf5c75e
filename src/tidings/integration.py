"""Integration events: the events a service publishes to other services, its public contract.

Domain events are a service's own record of what happened, free to change with its model.
Integration events are the part other services may rely on: versioned, documented, published on
the bus. Declare one by subclassing :class:`IntegrationEvent` and naming the publishing service::

    class OrderSubmitted(IntegrationEvent):
        __source__ = "orders"
        order_id: str
        total: int

A service publishes the integration events whose ``__source__`` is its name: the ones its handlers
emit or that it appends, and the ones it *translates* from its domain events
(:meth:`tidings.Service.translates`). Another service handles them with the same
``@service.handles(OrderSubmitted)`` as local events; with a bus configured, that handler is fed
by a durable consumer group on the bus instead of the local log.
"""

from __future__ import annotations

from typing import ClassVar

from tidings.errors import EventTypeError
from tidings.events import Event

__all__ = ["IntegrationEvent", "source_of"]


class IntegrationEvent(Event):
    """Base class of integration events; set ``__source__`` to the publishing service's name."""

    __event_register__: ClassVar[bool] = False
    __source__: ClassVar[str]


def source_of(cls: type[Event]) -> str | None:
    """The publishing service of an integration event class, or None for a domain event."""
    if not (isinstance(cls, type) and issubclass(cls, IntegrationEvent)):
        return None
    source = getattr(cls, "__source__", None)
    if not isinstance(source, str) or not source:
        raise EventTypeError(
            f"{cls.__qualname__} is an IntegrationEvent without __source__: "
            "name the service that publishes it"
        )
    return source
