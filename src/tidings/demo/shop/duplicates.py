"""Duplicate delivery, injected: a bus that re-publishes some messages as new bus messages.

At-least-once delivery means every consumer sees some messages twice (a relay that died after
publishing, a lost acknowledgement, a producer that retried). :class:`DuplicatingBus` makes that
happen on purpose and at a seeded rate: after publishing a batch it re-publishes a fraction of the
envelopes, as the same CloudEvent (same event id) under a *new* broker message id, so the broker's
own de-duplication does not drop them and they reach the consumers. Every consumer must absorb
them: the services' inboxes count what they skipped (``Service.duplicates_skipped``).
"""

from __future__ import annotations

import random
import uuid
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
)
from tidings.bus.cloudevents import encode
from tidings.errors import InvalidArgument
from tidings.events import EventRegistry, RecordedEvent

__all__ = ["DuplicatingBus"]


class DuplicatingBus(Bus):
    """Wraps ``inner``; re-publishes each published envelope again with probability ``rate``.

    Opening and closing are the inner bus's business (share one inner bus between services).
    """

    def __init__(self, inner: Bus, rate: float, seed: int) -> None:
        if not 0 <= rate < 1:
            raise InvalidArgument(f"the duplicate rate must be in [0, 1), got {rate!r}")
        self.inner = inner
        self.rate = rate
        self.url = inner.url
        self.injected = 0
        self._random = random.Random(seed)

    async def open(self) -> DuplicatingBus:
        return self

    async def close(self) -> None:
        return None

    async def publish(self, service: str, envelopes: Iterable[RecordedEvent]) -> PublishResult:
        batch = list(envelopes)
        result = await self.inner.publish(service, batch)
        if self.rate:
            for envelope in batch:
                if self._random.random() < self.rate:
                    await self.inner.publish_raw(
                        service,
                        envelope.event_type,
                        envelope.stream_id,
                        encode(envelope, service),
                        msg_id=str(uuid.uuid4()),
                    )
                    self.injected += 1
        return result

    async def publish_raw(
        self, service: str, event_type: str, key: str, payload: bytes, *, msg_id: str | None = None
    ) -> bool:
        return await self.inner.publish_raw(service, event_type, key, payload, msg_id=msg_id)

    async def consume_batches(
        self,
        group: ConsumerGroup,
        handler: BatchHandler,
        dead_letter: DeadLetterHandler,
        *,
        registry: EventRegistry | None = None,
    ) -> Consumer:
        return await self.inner.consume_batches(group, handler, dead_letter, registry=registry)

    async def statistics(self) -> BusStatistics:
        return await self.inner.statistics()

    async def setup(
        self, publishing: Iterable[str] = (), groups: Iterable[ConsumerGroup] = ()
    ) -> list[SetupAction]:
        return await self.inner.setup(publishing, groups)
