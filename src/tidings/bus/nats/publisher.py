"""Publishing to JetStream: one message per event, ``Nats-Msg-Id`` = event id, ack awaited."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable

import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import APIError

from tidings.bus.base import PublishResult, check_event_type, check_name, partition_of
from tidings.bus.cloudevents import CONTENT_TYPE, encode
from tidings.bus.errors import BusError, BusUnavailable
from tidings.bus.nats.config import NatsBusConfig
from tidings.bus.nats.setup import ensure_stream
from tidings.events import RecordedEvent

__all__ = ["Publisher"]

# JetStream answers these when a stream is (temporarily) without a leader or quorum.
_UNAVAILABLE_CODES = {10008, 10023}


class Publisher:
    """Publishes a service's events into its stream, creating the stream on first use."""

    def __init__(self, js: JetStreamContext, config: NatsBusConfig) -> None:
        self.js = js
        self.config = config
        self.partitions: dict[str, int] = {}
        self.published = 0
        self.duplicates = 0

    async def stream_partitions(self, service: str) -> int:
        partitions = self.partitions.get(service)
        if partitions is None:
            try:
                partitions = await ensure_stream(self.js, self.config, check_name("service", service))
            except (nats.errors.Error, OSError) as exc:
                if isinstance(exc, APIError) and exc.err_code not in _UNAVAILABLE_CODES:
                    raise BusError(f"JetStream refused the stream of {service!r}: {exc}") from exc
                raise BusUnavailable(f"cannot set up the stream of {service!r}: {exc!r}") from exc
            self.partitions[service] = partitions
        return partitions

    async def publish(self, service: str, envelopes: Iterable[RecordedEvent]) -> PublishResult:
        """Publish in order per stream id; different stream ids go out concurrently.

        Within one stream id each publish waits for the previous one's ack, so a failure can never
        leave a later version stored before an earlier one; after an error each stream id has a
        prefix of its events stored, and publishing the batch again completes it (duplicates dropped).
        """
        partitions = await self.stream_partitions(service)
        by_stream: dict[str, list[tuple[str, bytes, str, str]]] = defaultdict(list)
        for envelope in envelopes:
            event_type = check_event_type(envelope.event_type)
            subject = self.config.subject(service, partition_of(envelope.stream_id, partitions), event_type)
            by_stream[envelope.stream_id].append(
                (subject, encode(envelope, service), str(envelope.event_id), envelope.stream_id)
            )
        if not by_stream:
            return PublishResult(0, 0)
        stream = self.config.stream_name(service)

        async def one_stream(items: list[tuple[str, bytes, str, str]]) -> tuple[int, int]:
            stored = dropped = 0
            for subject, payload, msg_id, _ in items:
                if await self._send(stream, subject, payload, msg_id):
                    stored += 1
                else:
                    dropped += 1
            return stored, dropped

        results = await asyncio.gather(
            *(one_stream(items) for items in by_stream.values()), return_exceptions=True
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # Every failure is the same kind of news (the broker is unreachable); raise the first,
            # with the others chained in its notes so none is silently dropped.
            first = errors[0]
            for other in errors[1:]:
                first.add_note(f"also: {other!r}")
            raise first
        stored = sum(r[0] for r in results if not isinstance(r, BaseException))
        dropped = sum(r[1] for r in results if not isinstance(r, BaseException))
        return PublishResult(stored, dropped)

    async def publish_raw(
        self, service: str, event_type: str, key: str, payload: bytes, msg_id: str | None
    ) -> bool:
        partitions = await self.stream_partitions(service)
        subject = self.config.subject(service, partition_of(key, partitions), check_event_type(event_type))
        return await self._send(self.config.stream_name(service), subject, payload, msg_id)

    async def _send(self, stream: str, subject: str, payload: bytes, msg_id: str | None) -> bool:
        headers = {"Content-Type": CONTENT_TYPE}
        if msg_id is not None:
            headers["Nats-Msg-Id"] = msg_id
        try:
            ack = await self.js.publish(
                subject, payload, timeout=self.config.request_timeout, stream=stream, headers=headers
            )
        except APIError as exc:
            if exc.err_code in _UNAVAILABLE_CODES or (exc.code or 0) >= 500:
                raise BusUnavailable(f"JetStream could not store a message on {subject}: {exc}") from exc
            raise BusError(f"JetStream refused a message on {subject}: {exc}") from exc
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            # No ack: the message may or may not be stored; publishing it again is safe (Nats-Msg-Id).
            raise BusUnavailable(f"no acknowledgement for a message on {subject}: {exc!r}") from exc
        if ack.duplicate:
            self.duplicates += 1
            return False
        self.published += 1
        return True
