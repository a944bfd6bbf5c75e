"""The :class:`NatsBus`: a connection to a JetStream cluster, a publisher and group members."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from tidings.bus.base import (
    BatchHandler,
    Bus,
    BusStatistics,
    Consumer,
    ConsumerGroup,
    DeadLetterHandler,
    PublishResult,
    SetupAction,
    registry_or_default,
)
from tidings.bus.errors import BusClosed, BusError, BusUnavailable
from tidings.errors import MissingExtra
from tidings.events import EventRegistry, RecordedEvent

try:
    import nats
    import nats.errors
    from nats.aio.client import Client
    from nats.js import JetStreamContext
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtra("the NATS bus", "nats", exc) from exc

from tidings.bus.nats.config import NatsBusConfig
from tidings.bus.nats.consumer import NatsMember
from tidings.bus.nats.publisher import Publisher
from tidings.bus.nats.setup import setup

__all__ = ["NatsBus"]

log = logging.getLogger("tidings.bus.nats")

_NATS_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)


class NatsBus(Bus):
    """The bus on NATS JetStream; see :mod:`tidings.bus.nats` for the design."""

    def __init__(self, config: NatsBusConfig) -> None:
        self.config = config
        self.url = ",".join(config.servers)
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._publisher: Publisher | None = None
        self._members: list[NatsMember] = []
        self._closed = False

    async def open(self) -> NatsBus:
        if self._closed:
            raise BusClosed("this bus was closed; open a new one")
        if self._nc is not None:
            return self

        async def on_error(exc: Exception) -> None:
            log.debug("NATS client error: %r", exc)

        async def on_disconnect() -> None:
            log.info("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            log.info("reconnected to NATS")

        client = Client()
        # nats-py retries the first connection forever when reconnects are unlimited (which they
        # must be later, to ride out server restarts): bound the first connection ourselves.
        first_connect = self.config.request_timeout * (len(self.config.servers) + 1)
        try:
            await asyncio.wait_for(
                client.connect(
                    servers=list(self.config.servers),
                    name=self.config.name or "tidings",
                    # nats-py annotates these seconds as int but takes fractions.
                    connect_timeout=self.config.request_timeout,  # type: ignore[arg-type]
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.25,  # type: ignore[arg-type]
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                ),
                first_connect,
            )
        except _NATS_ERRORS as exc:
            with contextlib.suppress(*_NATS_ERRORS):
                await client.close()
            raise BusUnavailable(f"cannot connect to NATS at {self.url}: {exc!r}") from exc
        self._nc = client
        self._js = self._nc.jetstream(timeout=self.config.request_timeout)
        self._publisher = Publisher(self._js, self.config)
        return self

    @property
    def js(self) -> JetStreamContext:
        if self._closed:
            raise BusClosed("the bus is closed")
        if self._js is None:
            raise BusClosed("the bus is not open: use 'async with bus' or 'await bus.open()'")
        return self._js

    @property
    def publisher(self) -> Publisher:
        self.js  # noqa: B018 - raises if not open
        assert self._publisher is not None
        return self._publisher

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(m.stop() for m in self._members), return_exceptions=True)
        if self._nc is not None:
            with contextlib.suppress(*_NATS_ERRORS):
                await self._nc.drain()
            with contextlib.suppress(*_NATS_ERRORS):
                await self._nc.close()

    async def publish(self, service: str, envelopes: Iterable[RecordedEvent]) -> PublishResult:
        return await self.publisher.publish(service, envelopes)

    async def publish_raw(
        self, service: str, event_type: str, key: str, payload: bytes, *, msg_id: str | None = None
    ) -> bool:
        return await self.publisher.publish_raw(service, event_type, key, payload, msg_id)

    async def consume_batches(
        self,
        group: ConsumerGroup,
        handler: BatchHandler,
        dead_letter: DeadLetterHandler,
        *,
        registry: EventRegistry | None = None,
    ) -> Consumer:
        js = self.js
        assert self._nc is not None
        member = NatsMember(
            self._nc, js, self.config, group, handler, dead_letter, registry_or_default(registry)
        )
        try:
            await member.start()
        except _NATS_ERRORS as exc:
            await member.stop()
            raise BusUnavailable(f"cannot set up consumer group {group.label}: {exc!r}") from exc
        except BusError:
            await member.stop()
            raise
        self._members.append(member)
        return member

    async def setup(
        self, publishing: Iterable[str] = (), groups: Iterable[ConsumerGroup] = ()
    ) -> list[SetupAction]:
        try:
            return await setup(self.js, self.config, publishing, groups)
        except _NATS_ERRORS as exc:
            raise BusUnavailable(f"cannot set up the bus on {self.url}: {exc!r}") from exc

    async def statistics(self) -> BusStatistics:
        publisher = self._publisher
        pending: int | None = 0
        durables: dict[tuple[str, str], None] = {}
        for member in self._members:
            for (source, _), durable in member.durables.items():
                durables[(self.config.stream_name(source), durable)] = None
        if self._js is not None and not self._closed:
            try:
                for stream, durable in durables:
                    info = await self._js.consumer_info(stream, durable)
                    pending = (pending or 0) + info.num_pending + info.num_ack_pending
            except _NATS_ERRORS:
                pending = None
        counters = [m.counters for m in self._members]
        return BusStatistics(
            published=publisher.published if publisher else 0,
            duplicates=publisher.duplicates if publisher else 0,
            delivered=sum(c.delivered for c in counters),
            acked=sum(c.acked for c in counters),
            redelivered=sum(c.redelivered for c in counters),
            dead_lettered=sum(c.dead_lettered for c in counters),
            pending=pending,
            consumers=tuple(m.statistics() for m in self._members),
        )
