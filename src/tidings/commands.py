"""Commands: requests addressed to one owner service, named in the imperative (``ReserveStock``).

A command is stored and carried in the same envelope as an event (so it goes through the same
outbox, inbox and dead letters), but it means something else: an event says what happened and is
published to whoever listens; a command asks one service to do something, and that service
answers with events. On a bus, the sender's outbox relay publishes a command into its
destination's subject space, and only the destination's command handler consumes it. A service
declares the commands it owns with :meth:`tidings.Service.handles_command`; two handlers of one
command type in a service are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from tidings.events import Event

__all__ = ["Command", "destination_of"]


class Command(Event):
    """Base class of commands: immutable, validated, JSON-serialisable like events.

    Name commands in the imperative (``PlaceOrder``). Sagas send them with a ``saga_id`` in the
    metadata; events a handler emits while handling the command carry it on, which is how the
    saga recognises its replies.
    """

    __event_register__: ClassVar[bool] = False
    __owner__: ClassVar[str | None] = None
    """The service that handles this command, when it is always the same one; a sender may also
    name it per message (a saga step's ``to``), which wins."""


def destination_of(command: Command, metadata: Mapping[str, Any]) -> str | None:
    """Where a command goes: the ``destination`` in its metadata, else its class's ``__owner__``."""
    destination = metadata.get("destination")
    if isinstance(destination, str) and destination:
        return destination
    return type(command).__owner__
