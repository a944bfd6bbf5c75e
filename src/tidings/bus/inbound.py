"""Handlers fed by the bus: integration events of other services, handled exactly once in effect.

A handler group of a service that handles another service's integration events joins a durable
consumer group on the bus and takes its messages in batches (up to ``max_batch`` of one
partition, in order). It runs the handler of each with a
:class:`~tidings.processing.context.HandlerContext` sharing one
:class:`~tidings.processing.context.BatchState` (a handler sees the effects of those before it in
the batch, as over the store's log), then commits every handler's effects together with an inbox
row per message (its event id) in one transaction of the service's own store, and only then lets
the bus acknowledge the batch. A redelivered message whose id is in the inbox is acknowledged
without running the handler again: delivery is at-least-once, effects are exactly-once.

A handler that fails ends the batch there: the messages before it commit, and it goes back to the
bus's retry policy alone (then the rest of the batch follows). A commit the store refuses because
another writer changed a stream a handler loaded keeps the effects that do not rest on that stream
(:func:`~tidings.processing.handling.split_on_conflict`; messages of one published stream id count
as touching the same stream, so their order holds) and sends the first message to redo back to the
retry policy, the rest following it; a commit refused for another reason (a SQL error) runs the
messages again one at a time, so that the failure lands on its own message.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from tidings import tracing
from tidings.bus.base import BatchOutcome, Bus, Consumer, ConsumerGroup, DeliveryPolicy
from tidings.bus.message import DeadLetter, IncomingMessage
from tidings.errors import (
    AlreadyProcessed,
    CheckpointConflict,
    ConcurrencyError,
    TidingsError,
    is_transient,
)
from tidings.events import RecordedEvent
from tidings.processing.context import BatchState, HandlerContext, statements_work
from tidings.processing.handlers import Dispatch, call_handler
from tidings.processing.handling import split_on_conflict
from tidings.processing.retry import handler_failure
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
        self.consumer = await self.bus.consume_batches(
            self.consumer_group, self.on_batch, self.on_dead_letter, registry=self.store.registry
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
        """Handle one message (a batch of one); raises what its handler raised."""
        outcome = await self.on_batch([message])
        if outcome.error is not None:
            raise outcome.error

    async def on_batch(self, messages: Sequence[IncomingMessage]) -> BatchOutcome:
        """Handle messages of one partition in order and commit their effects and inbox rows in
        one transaction; see the module docstring for failures and refused commits."""
        wanted = [m.event_id for m in messages if self.dispatch.find(m.event) is not None]
        seen = set(await self.store.processed_ids(self.key, wanted)) if wanted else set()
        batch = BatchState(self.store)
        done: list[tuple[int, HandlerContext]] = []
        for index, message in enumerate(messages):
            fn = self.dispatch.find(message.event)
            if fn is None:
                continue
            if message.event_id in seen:
                # Handled before (a redelivery after the ack was lost), or earlier in this batch.
                self.skipped_duplicates += 1
                continue
            ctx = self._context(message, batch)
            try:
                await call_handler(fn, message.event, ctx)
            except BaseException as exc:
                if not handler_failure(exc):
                    raise
                failed = await self._commit_done(done)
                if failed is not None:
                    return failed
                return BatchOutcome(index, exc)
            seen.add(message.event_id)
            batch.absorb(ctx)
            done.append((index, ctx))
        failed = await self._commit_done(done)
        return failed if failed is not None else BatchOutcome(len(messages))

    def _context(self, message: IncomingMessage, batch: BatchState | None) -> HandlerContext:
        ctx = HandlerContext(
            self.store,
            self.recorded(message),
            self.group,
            message.attempt,
            batch,
            sql=self.sql,
            service=self.service,
        )
        # Messages of one published stream id keep their order through a refused commit's split.
        ctx.touched.add(f"\x00bus {message.service} {message.stream_id}")
        return ctx

    async def _commit_done(self, done: list[tuple[int, HandlerContext]]) -> BatchOutcome | None:
        """Commit the handled messages' effects with their inbox rows. None if they all stand (or
        were found handled already); else where the batch must stop: the first message that failed
        when run again alone (everything before it is committed)."""
        if not done:
            return None
        try:
            await self._commit([ctx for _, ctx in done])
            self.handled += len(done)
            return None
        except TidingsError as exc:
            if is_transient(exc):
                raise  # nothing committed: the batch is tried again as it is
            refusal: TidingsError = exc
        if isinstance(refusal, ConcurrencyError):
            valid, invalid = split_on_conflict([ctx for _, ctx in done], refusal.stream_id)
        elif isinstance(refusal, AlreadyProcessed):
            # Another delivery of some of them (a member that stalled past its ack wait) committed
            # first: their effects stand, these are dropped, and what rested on them runs again.
            dropped = {str(e) for e in refusal.event_ids}
            bad: set[str] = set()
            valid, invalid = [], []
            for _, ctx in done:
                if str(ctx.recorded.event_id) in dropped:
                    bad |= ctx.touched
                    self.skipped_duplicates += 1
                elif ctx.touched & bad:
                    invalid.append(ctx)
                    bad |= ctx.touched
                else:
                    valid.append(ctx)
        else:
            # The store refused something it cannot name a message for (a SQL error): run them
            # again one at a time, so the failure lands on one of them.
            valid, invalid = [], [ctx for _, ctx in done]
        # Expected when members or partitions share streams (two orders of one SKU): not a fault.
        log.info(
            "%s: commit refused (%s); %d of %d messages run again", self.key, refusal, len(invalid), len(done)
        )
        if valid:
            await self._commit(valid)
            self.handled += len(valid)
        index_of = {id(ctx): index for index, ctx in done}
        if isinstance(refusal, ConcurrencyError) and invalid:
            # Another writer is busy on that stream (two orders of one SKU in two partitions):
            # running again at once would mostly meet it again. The first message to redo goes
            # back to the retry policy and its back-off; the ones after it follow it in order.
            return BatchOutcome(index_of[id(invalid[0])], refusal)
        for ctx in invalid:
            error = await self._run_alone(ctx)
            if error is not None:
                return BatchOutcome(index_of[id(ctx)], error)
        return None

    async def _run_alone(self, previous: HandlerContext) -> BaseException | None:
        """Handle one message again on fresh state and commit it; the error if it failed."""
        recorded = previous.recorded
        fn = self.dispatch.find(recorded.event)
        assert fn is not None
        ctx = HandlerContext(
            self.store, recorded, self.group, previous.attempt, None, sql=self.sql, service=self.service
        )
        try:
            await call_handler(fn, recorded.event, ctx)  # type: ignore[arg-type]
            await self._commit([ctx])
        except AlreadyProcessed:
            self.skipped_duplicates += 1
            return None
        except BaseException as exc:
            if not handler_failure(exc):
                raise
            if is_transient(exc):
                raise
            return exc
        self.handled += 1
        return None

    async def _commit(self, contexts: Sequence[HandlerContext]) -> None:
        await self._commit_batch(
            work=statements_work(contexts),
            appends=tuple(a for ctx in contexts for a in ctx.appends),
            processed=tuple((ctx.recorded.event_id, 0) for ctx in contexts),
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
