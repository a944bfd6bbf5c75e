"""Handlers fed by the bus: integration events of other services, handled exactly once in effect.

A handler group of a service that handles another service's integration events joins a durable
consumer group on the bus. For each message it runs the handler with a
:class:`~tidings.processing.context.HandlerContext`, then commits the handler's effects together
with an inbox row (the message's event id) in the service's own store, and only then lets the bus
acknowledge the message. A redelivered message whose id is in the inbox is acknowledged without
running the handler again: delivery is at-least-once, effects are exactly-once.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from tidings import tracing
from tidings.bus.base import Bus, Consumer, ConsumerGroup, DeliveryPolicy
from tidings.bus.message import DeadLetter, IncomingMessage
from tidings.errors import AlreadyProcessed, CheckpointConflict, TidingsError
from tidings.events import RecordedEvent
from tidings.processing.context import HandlerContext, statements_work
from tidings.processing.handlers import Dispatch, call_handler
from tidings.processing.subscription import SubscriptionStats
from tidings.store.tracking import DeadLetterRecord, ProcessedBatch, TrackingStore

__all__ = ["BusHandlerGroup", "bus_group_name", "inbox_group"]

log = logging.getLogger("tidings.bus.inbound")

_NAMESPACE = uuid.UUID("9e7d2a51-7c1e-4f0b-a3f4-3d2b8c6e0a17")


def bus_group_name(group: str) -> str:
    """A handler group's name as a bus consumer group (subject-safe: dots become dashes)."""
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in group)[:64]


def inbox_group(group: str) -> str:
    """The key of a bus-fed group's inbox and dead letters in the service's store."""
    return f"{group}@bus"


class BusHandlerGroup:
    """One handler group of a service, fed by a consumer group on the bus."""

    def __init__(
        self,
        store: TrackingStore,
        bus: Bus,
        service: str,
        group: str,
        dispatch: Dispatch,
        sources: dict[str, set[str]],
        *,
        delivery: DeliveryPolicy | None = None,
        sql: bool = True,
    ) -> None:
        self.store = store
        self.bus = bus
        self.group = group
        self.service = service
        self.key = inbox_group(group)
        self.dispatch = dispatch
        self.sql = sql
        self.consumer_group = ConsumerGroup(service, bus_group_name(group), sources, delivery)
        self.consumer: Consumer | None = None
        self.handled = 0
        self.skipped_duplicates = 0
        self.dead_lettered = 0
        self.last_error: str | None = None
        self._checkpoint = 0

    async def start(self) -> None:
        self.consumer = await self.bus.consume(
            self.consumer_group, self.on_message, self.on_dead_letter, registry=self.store.registry
        )

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()
            self.consumer = None

    def statistics(self) -> SubscriptionStats:
        """The group as the CLI and console show subscriptions (``<group>@bus``; no log position:
        ``retries`` counts redeliveries, ``in_flight`` nothing)."""
        consumer = self.consumer.statistics() if self.consumer is not None else None
        return SubscriptionStats(
            self.key,
            "live" if consumer is not None else "stopped",
            0,
            0,
            0,
            0,
            self.handled,
            self.skipped_duplicates,
            consumer.redelivered if consumer is not None else 0,
            self.dead_lettered,
            self.last_error,
        )

    def recorded(self, message: IncomingMessage) -> RecordedEvent:
        """The message in the envelope handlers know (position 0: it is not in this store's log)."""
        return RecordedEvent(
            message.event_id,
            message.event_type,
            message.stream_id,
            message.stream_version or 0,
            0,
            message.time or datetime.now(UTC),
            message.event,
            {**message.metadata, "source": message.service},
            message.schema_version,
        )

    async def on_message(self, message: IncomingMessage) -> None:
        fn = self.dispatch.find(message.event)
        if fn is None:
            return
        if await self.store.processed_ids(self.key, [message.event_id]):
            self.skipped_duplicates += 1
            return  # handled before: a redelivery after the ack was lost
        ctx = HandlerContext(
            self.store,
            self.recorded(message),
            self.group,
            message.attempt,
            sql=self.sql,
            service=self.service,
        )
        await call_handler(fn, message.event, ctx)
        try:
            await self._commit([ctx], message.event_id)
        except AlreadyProcessed:
            # Another delivery of it (a member that stalled past its ack wait) committed first:
            # its effects stand, these are dropped, and the message is done.
            self.skipped_duplicates += 1
            return
        self.handled += 1

    async def _commit(self, contexts: Sequence[HandlerContext], event_id: uuid.UUID) -> None:
        await self._commit_batch(
            work=statements_work(contexts),
            appends=tuple(a for ctx in contexts for a in ctx.appends),
            processed=((event_id, 0),),
        )

    async def _commit_batch(self, **parts: Any) -> None:
        """Commit with the inbox group's checkpoint unchanged. A bus-fed group has no place in this
        store's log, so its checkpoint stays where it is (0) and costs no read per message; if
        someone moved it by hand, the conflict says so once and the stored value is used."""
        for _ in range(2):
            try:
                await self.store.commit_processed(
                    ProcessedBatch(
                        group=self.key,
                        expected_checkpoint=self._checkpoint,
                        checkpoint=self._checkpoint,
                        **parts,
                    )
                )
                return
            except CheckpointConflict as exc:
                self._checkpoint = exc.actual
        raise TidingsError(f"{self.key}: its checkpoint keeps moving; something else writes it")

    async def on_dead_letter(self, letter: DeadLetter) -> None:
        message = letter.message
        event_id = message.event_id if message is not None else uuid.uuid5(_NAMESPACE, letter.payload.hex())
        error = letter.error
        self.last_error = letter.reason
        if message is not None:
            tracing.dead_lettered(self.recorded(message), self.group, letter.attempts, error)
        record = DeadLetterRecord(
            0,
            event_id,
            message.stream_id if message is not None else letter.subject,
            message.event_type if message is not None else "(undecodable)",
            f"from the bus ({letter.origin}): {letter.reason}",
            "".join(traceback.format_exception(error))
            if error is not None
            else letter.payload.decode("utf-8", "replace")[:10_000],
            letter.attempts,
        )
        await self._commit_batch(dead_letters=(record,))
        self.dead_lettered += 1
