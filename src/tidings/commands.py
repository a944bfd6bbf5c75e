"""Commands: requests addressed to one owner service, named in the imperative (``ReserveStock``).

A command is stored and carried in the same envelope as an event (so it goes through the same
outbox, inbox and dead letters), but it means something else: an event says what happened and is
published to whoever listens; a command asks one service to do something, and that service
answers with events. A service declares the commands it owns with
:meth:`tidings.Service.handles_command`; two handlers of one command type in a service are refused.
"""

from __future__ import annotations

from typing import ClassVar

from tidings.events import Event

__all__ = ["Command"]


class Command(Event):
    """Base class of commands: immutable, validated, JSON-serialisable like events.

    Name commands in the imperative (``PlaceOrder``). Sagas send them with a ``saga_id`` in the
    metadata; events a handler emits while handling the command carry it on, which is how the
    saga recognises its replies.
    """

    __event_register__: ClassVar[bool] = False
