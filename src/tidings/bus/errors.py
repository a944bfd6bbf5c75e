"""The errors of the bus layer, in the :class:`~tidings.errors.TidingsError` family.

* :class:`BusUnavailable` is transient: the broker cannot be reached or did not confirm in time.
  A publisher retries the same publish (de-duplication by event id makes that safe).
* :class:`UndecodableMessage` and its subclasses are permanent: the bytes on the wire can never
  become a typed event, so the message is dead-lettered at its first delivery with the reason.
* :class:`BusConfigError` is permanent: a name or setting is invalid, or what the broker holds
  (a stream, a consumer) contradicts the configuration and cannot be changed in place.
"""

from __future__ import annotations

from tidings.errors import InvalidArgument, SerializationError, TidingsError

__all__ = [
    "BusClosed",
    "BusConfigError",
    "BusError",
    "BusUnavailable",
    "InvalidMessageData",
    "NotACloudEvent",
    "UndecodableMessage",
    "UnknownMessageType",
]


class BusError(TidingsError):
    """Something in the bus layer failed."""


class BusUnavailable(BusError):
    """The broker cannot serve the request now (no connection, no confirmation in time).

    Transient: trying the same operation again later is safe and may succeed.
    """

    transient = True


class BusClosed(BusError):
    """The bus was used after ``close()``."""

    permanent = True


class BusConfigError(InvalidArgument):
    """A bus name or setting is invalid, or the broker's existing set-up contradicts it."""


class UndecodableMessage(SerializationError):
    """A message's bytes cannot be turned into a typed event; ``reason`` says why.

    Permanent: the consumer dead-letters such a message at once instead of retrying it.
    """

    def __init__(self, reason: str, *, event_id: str | None = None, event_type: str | None = None) -> None:
        where = ""
        if event_id is not None:
            where += f" id={event_id!r}"
        if event_type is not None:
            where += f" type={event_type!r}"
        super().__init__(f"undecodable message{where}: {reason}")
        self.reason = reason
        self.event_id = event_id
        self.event_type = event_type


class NotACloudEvent(UndecodableMessage):
    """The bytes are not JSON, not a JSON object, or not a CloudEvents 1.0 structured event."""


class UnknownMessageType(UndecodableMessage):
    """The CloudEvent's ``type`` has no event class in the consumer's registry."""


class InvalidMessageData(UndecodableMessage):
    """The CloudEvent's ``data`` does not validate against its event class's schema."""
