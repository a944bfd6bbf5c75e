"""The event bus between services: integration events as CloudEvents, on NATS JetStream or in-process.

Choose a backend by URL with :func:`open_bus`:

* ``memory://`` (optionally ``memory://?partitions=8``) -- :class:`~tidings.bus.memory.MemoryBus`;
* ``nats://host:port[,host:port...][?partitions=8&replicas=3&...]`` --
  :class:`~tidings.bus.nats.NatsBus` (needs ``pip install 'tidings[nats]'``); see
  :mod:`tidings.bus.nats` for the subjects, streams, partitioning and failover bound.

Every backend passes :class:`tidings.testing.bus.BusContract`.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from tidings.bus.base import (
    BatchHandler,
    BatchOutcome,
    Bus,
    BusStatistics,
    Consumer,
    ConsumerGroup,
    ConsumerStatistics,
    DeadLetterHandler,
    DeliveryPolicy,
    MessageHandler,
    PublishResult,
    SetupAction,
    partition_of,
)
from tidings.bus.cloudevents import decode, encode
from tidings.bus.errors import (
    BusClosed,
    BusConfigError,
    BusError,
    BusUnavailable,
    InvalidMessageData,
    NotACloudEvent,
    UndecodableMessage,
    UnknownMessageType,
)
from tidings.bus.message import DeadLetter, IncomingMessage

__all__ = [
    "BatchHandler",
    "BatchOutcome",
    "Bus",
    "BusClosed",
    "BusConfigError",
    "BusError",
    "BusStatistics",
    "BusUnavailable",
    "Consumer",
    "ConsumerGroup",
    "ConsumerStatistics",
    "DeadLetter",
    "DeadLetterHandler",
    "DeliveryPolicy",
    "IncomingMessage",
    "InvalidMessageData",
    "MessageHandler",
    "NotACloudEvent",
    "PublishResult",
    "SetupAction",
    "UndecodableMessage",
    "UnknownMessageType",
    "decode",
    "encode",
    "open_bus",
    "partition_of",
]


def open_bus(url: str) -> Bus:
    """The bus named by ``url`` (not yet connected: use ``async with`` or ``await bus.open()``).

    Raises :class:`~tidings.bus.errors.BusConfigError` for an unknown scheme or a bad option, and
    :class:`~tidings.errors.MissingExtra` for ``nats://`` without the ``nats`` extra.
    """
    parts = urlsplit(url)
    if parts.scheme == "memory":
        from tidings.bus.memory import DEFAULT_PARTITIONS, MemoryBus

        options = dict(parse_qsl(parts.query))
        unknown = set(options) - {"partitions"}
        if unknown:
            raise BusConfigError(f"unknown memory bus option(s) {sorted(unknown)} in {url!r}")
        try:
            partitions = int(options.get("partitions", DEFAULT_PARTITIONS))
        except ValueError as exc:
            raise BusConfigError(f"partitions must be an integer in {url!r}") from exc
        return MemoryBus(url, partitions=partitions)
    if parts.scheme in ("nats", "tls"):
        from tidings.bus.nats import NatsBus, NatsBusConfig

        return NatsBus(NatsBusConfig.from_url(url))
    raise BusConfigError(f"no bus backend for {url!r}: use memory:// or nats://host:port[,host:port]")
