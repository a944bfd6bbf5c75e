"""The subscription that runs async handlers: one event at a time, effects committed per batch.

Each handler's effects are buffered in its :class:`~tidings.processing.context.HandlerContext`
and made visible to the next handlers of the batch (:class:`BatchState`); the batch's effects
then commit with the checkpoint in one transaction. When that commit is refused because another
writer changed a stream that some handlers loaded or wrote, only those handlers' events (and the
later ones that touched the same streams) run again; the others' effects commit as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tidings.errors import CheckpointConflict, ConcurrencyError, InvalidArgument, TidingsError, is_transient
from tidings.events import Event, RecordedEvent
from tidings.processing.context import BatchState, HandlerContext
from tidings.processing.handlers import Dispatch, call_handler
from tidings.processing.retry import handler_failure, retry_event
from tidings.processing.subscription import Subscription, SubscriptionConfig
from tidings.store.tracking import SQLStore, TrackingStore

__all__ = ["HandlerSubscription", "split_on_conflict"]

log = logging.getLogger("tidings.processing")


def split_on_conflict(
    done: Sequence[HandlerContext], stream_id: str
) -> tuple[list[HandlerContext], list[HandlerContext]]:
    """Split a batch whose commit was refused on ``stream_id`` into the contexts whose effects
    stand and those that must run again.

    A context must run again if it loaded or wrote a stream that the conflict, or a context
    already marked, touched: its effects rest on state that is now stale. Contexts before the
    first such one stand; a later one stands only if it touched none of those streams, so the
    events of one stream keep their order.
    """
    bad = {stream_id}
    valid: list[HandlerContext] = []
    invalid: list[HandlerContext] = []
    for ctx in done:
        if ctx.touched & bad:
            invalid.append(ctx)
            bad |= ctx.touched
        else:
            valid.append(ctx)
    return valid, invalid


class HandlerSubscription(Subscription):
    """Runs async handlers one event at a time; their effects commit with the checkpoint per batch.

    Events already handled ahead of the checkpoint (recorded in the group's inbox) are skipped.
    The inbox only gets rows for events committed ahead of the checkpoint, and rows the
    checkpoint has passed are pruned every :attr:`PRUNE_EVERY` steps and whenever the runner
    goes idle, so it stays small.
    """

    PRUNE_EVERY = 50

    def __init__(
        self,
        store: TrackingStore,
        group: str,
        dispatch: Dispatch,
        *,
        stream_prefix: str | None = None,
        config: SubscriptionConfig | None = None,
        sql: bool | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(
            store, group, event_types=dispatch.type_names, stream_prefix=stream_prefix, config=config
        )
        self.dispatch = dispatch
        self.sql = sql
        self.service = service
        self._steps_since_prune = 0
        self._pruned_to = 0

    def _context(self, recorded: RecordedEvent, attempt: int, batch: BatchState | None) -> HandlerContext:
        return HandlerContext(
            self.store, recorded, self.group, attempt, batch, sql=self.sql, service=self.service
        )

    async def process_batch(self, events: list[RecordedEvent], scanned_to: int) -> None:
        seen = await self.store.processed_ids(self.group, [e.event_id for e in events])
        batch = BatchState(self.store)
        done: list[HandlerContext] = []
        for index, recorded in enumerate(events):
            if self.stopping:
                # Commit what ran; everything before this event is handled or not ours.
                if index:
                    await self._commit_done(done, events[index - 1].position)
                return
            fn = self.dispatch.find(recorded.event)
            if recorded.event_id in seen or fn is None:
                self.skipped_duplicates += recorded.event_id in seen
                continue
            ctx = self._context(recorded, 1, batch)
            self.in_flight = 1
            try:
                assert isinstance(recorded.event, Event)
                await call_handler(fn, recorded.event, ctx)
            except BaseException as exc:
                self.in_flight = 0
                if not handler_failure(exc):
                    raise
                # Commit the successes before it, then give this event its retries alone.
                if index and not await self._commit_done(done, events[index - 1].position):
                    return
                done, batch = [], BatchState(self.store)
                if await self.handle_with_retries(recorded, first_error=exc) is None:
                    return  # stopping: the event is delivered again after the restart
                continue
            self.in_flight = 0
            batch.absorb(ctx)
            done.append(ctx)
        await self._commit_done(done, scanned_to)

    async def _commit_done(self, done: list[HandlerContext], checkpoint: int) -> bool:
        """Commit the handled events' effects with ``checkpoint``; False if stopping midway.

        A refused commit is resolved without running again the handlers whose effects stand.
        """
        try:
            await self.commit_patiently(checkpoint, contexts=done)
            # Counted once committed: a batch refused for a conflict runs again, and would
            # otherwise be counted twice.
            self.handled += len(done)
            return True
        except CheckpointConflict:
            raise
        except TidingsError as exc:
            if is_transient(exc):
                raise  # stopping during an outage: nothing committed, all is delivered again
            refusal: TidingsError = exc
        if isinstance(refusal, ConcurrencyError):
            valid, invalid = split_on_conflict(done, refusal.stream_id)
        else:
            # The store refused something it cannot name an event for (a SQL error, a duplicate
            # id): handle the events again one at a time, so the failure lands on one of them.
            valid, invalid = [], list(done)
        log.warning(
            "subscription %r: commit refused (%s); %d of %d events run again",
            self.group,
            refusal,
            len(invalid),
            len(done),
        )
        if not invalid:
            raise refusal  # the conflict names a stream no handler touched: a store bug
        first = invalid[0].recorded.position
        # The standing effects commit now; those past the first event to redo get inbox rows,
        # so that they are skipped when their events come round again.
        await self.commit_patiently(max(first - 1, self.checkpoint), contexts=valid)
        self.handled += len(valid)
        # Their first attempt was refused for the batch's sake, not theirs: each runs again at
        # once on fresh state, and only its own failure counts (a bad statement lands on its event).
        for ctx in invalid:
            if await self.handle_with_retries(ctx.recorded, first_error=None) is None:
                return False
        await self.commit_patiently(checkpoint)
        return True

    async def handle_with_retries(
        self, recorded: RecordedEvent, *, first_error: BaseException | None
    ) -> bool | None:
        """Handle one event (commit included) until it succeeds or is dead-lettered.

        Returns True if handled, False if dead-lettered (the checkpoint moves past the event
        either way), None if the runner was asked to stop while waiting to retry: then nothing
        is committed and the event is delivered again after the restart.
        """
        fn = self.dispatch.find(recorded.event)
        assert fn is not None and isinstance(recorded.event, Event)
        event = recorded.event

        async def attempt(number: int) -> None:
            ctx = self._context(recorded, number, None)
            self.in_flight = 1
            try:
                await call_handler(fn, event, ctx)
                await self.commit_patiently(recorded.position, contexts=[ctx])
            finally:
                self.in_flight = 0
            self.handled += 1

        async def park(error: BaseException, attempts: int) -> None:
            log.error(
                "subscription %r: dead-lettering %s after %d attempt(s): %s",
                self.group,
                recorded.event_id,
                attempts,
                error,
            )
            await self.commit_patiently(
                recorded.position, dead_letters=[self.dead_letter_record(recorded, error, attempts)]
            )

        return await retry_event(self, self.config.retry, first_error, attempt, park)

    async def housekeeping(self, *, idle: bool) -> None:
        """Prune the inbox rows that the stored checkpoint already proves handled."""
        self._steps_since_prune += 1
        store = self.store
        if not isinstance(store, SQLStore) or self.checkpoint <= self._pruned_to:
            return
        if not idle and self._steps_since_prune < self.PRUNE_EVERY:
            return
        group = self.group
        # Against the *stored* checkpoint, in the same transaction: a checkpoint moved back by
        # hand meanwhile (a replay) keeps the rows that still matter.
        await store.transaction(
            lambda tx: tx.execute(
                "DELETE FROM tidings_inbox WHERE group_name = ? AND position <= "
                "(SELECT position FROM tidings_checkpoints WHERE group_name = ?)",
                (group, group),
            )
        )
        self._steps_since_prune = 0
        self._pruned_to = self.checkpoint

    async def reprocess(self, recorded: RecordedEvent, dead_letter_id: int) -> bool:
        fn = self.dispatch.find(recorded.event)
        if fn is None or not isinstance(recorded.event, Event):
            raise InvalidArgument(f"group {self.group!r} has no handler for {recorded.event_type!r}")
        ctx = self._context(recorded, 1, None)
        # The checkpoint stays where it is: a parked event is behind it (or, after a replay
        # was requested, ahead of it, and moving the checkpoint would skip the events between).
        try:
            await call_handler(fn, recorded.event, ctx)
        except BaseException as exc:
            if not handler_failure(exc):
                raise
            await self.commit(self.checkpoint, dead_letters=[self.dead_letter_record(recorded, exc, 1)])
            return False
        await self.commit(self.checkpoint, contexts=[ctx], remove_dead_letter=dead_letter_id)
        return True
