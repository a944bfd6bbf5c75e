"""What a bus consumer receives: an :class:`IncomingMessage`, or a :class:`DeadLetter`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from tidings.events import Event

__all__ = ["DeadLetter", "IncomingMessage"]


@dataclasses.dataclass(frozen=True, slots=True)
class IncomingMessage:
    """An integration event as it arrived from the bus, decoded and validated.

    ``event_id`` is the publisher's event id (for a CloudEvent from a non-tidings client whose ``id``
    is not a UUID: the UUID5 of its ``source`` and ``id``, which the CloudEvents spec makes unique),
    so an inbox keyed by it de-duplicates redeliveries. ``stream_version`` is the event's version in
    its stream at the publisher (``None`` when the publisher did not say). ``attempt`` is the
    delivery count of this message, 1 at the first delivery.
    """

    event_id: UUID
    event_type: str
    source: str
    service: str
    stream_id: str
    stream_version: int | None
    schema_version: int
    time: datetime | None
    event: Event
    metadata: Mapping[str, Any]
    cloudevent_id: str
    attempt: int = 1

    @property
    def correlation_id(self) -> str | None:
        value = self.metadata.get("correlation_id")
        return None if value is None else str(value)

    @property
    def causation_id(self) -> str | None:
        value = self.metadata.get("causation_id")
        return None if value is None else str(value)


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message the bus gave up on, handed to the consuming service to park in its dead letters.

    ``reason`` says why (the decoding error, or the handler's last exception); ``message`` is the
    decoded message, or ``None`` when it could not be decoded; ``payload`` the raw bytes either way.
    ``origin`` names where it came from (``"bus:<publishing service>"``), ``subject`` the transport's
    address of the message (for NATS its subject ``<prefix>.<service>.<partition>.<event type>``).
    """

    group: str
    origin: str
    subject: str
    payload: bytes
    reason: str
    attempts: int
    message: IncomingMessage | None
    error: BaseException | None = dataclasses.field(default=None, compare=False)
