"""Checkpointed subscriptions over the store's global log.

A :class:`Subscription` reads the log from its group's checkpoint, catches up in batches, then
waits for appends (woken by the store, with a backstop poll) — the switch from catch-up to live is
the same loop, so nothing is missed or repeated at the switch. Each step commits its effects with
the new checkpoint in one transaction (:meth:`TrackingStore.commit_processed`), guarded by a
compare-and-set on the checkpoint so that two runners of one group never both commit an event.

Across processes, a runner first takes its group's *lease* (:mod:`tidings.processing.leases`)
and holds it with a heartbeat while it works; the others wait as standbys and take over when the
holder stops or dies. Within one process, runners of a group take turns through the store's
in-process group lock, without asking the database.

Two kinds of work run on it: *handlers* (async, one event at a time, effects buffered in a
:class:`~tidings.processing.handlers.HandlerContext`) and *projections* (sync, a batch of events
applied in the store's transaction). Failures are retried with backoff; an event that still fails
is dead-lettered with its error and the subscription moves on.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import logging
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from tidings import tracing
from tidings.errors import (
    CheckpointConflict,
    EventTypeError,
    InvalidArgument,
    SerializationError,
    TidingsError,
    is_transient,
)
from tidings.events import RecordedEvent
from tidings.processing.context import HandlerContext, statements_work
from tidings.processing.leases import Lease
from tidings.processing.retry import RetryPolicy, handler_failure
from tidings.store.tracking import DeadLetter, DeadLetterRecord, ProcessedBatch, TrackingStore, Tx

__all__ = ["RunnerBlocked", "Subscription", "SubscriptionConfig", "SubscriptionStats"]

log = logging.getLogger("tidings.processing")

WorkFn = Callable[[Tx], None]

State = Literal["idle", "standby", "catching up", "live", "stopped", "failed"]


@dataclasses.dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    """Tuning of a subscription runner.

    ``batch_size`` events are read per step; ``poll_interval`` bounds how long a wake-up that was
    lost (another process's append, a checkpoint reset by another process) can delay the runner.
    ``retry`` governs failing events. A store outage (a transient error) is waited out with a
    pause that starts at ``outage_backoff`` seconds and doubles up to ``max_outage_backoff``;
    an unexpected error in the runner itself pauses it for ``failure_backoff`` seconds.
    ``conflict_retries`` bounds how often a dead-letter retry is re-tried when the group's
    checkpoint keeps moving under it.

    ``lease_ttl`` is how long a runner's lease on its group outlives its last heartbeat
    (heartbeats come every ``lease_ttl / 3`` seconds). When the process holding a group dies,
    a standby in another process takes over within ``lease_ttl + min(poll_interval,
    lease_ttl / 4)`` seconds; a holder that cannot renew its lease for ``lease_ttl`` seconds
    stops calling handlers before a standby may take over. Shorter means faster failover and
    more heartbeat writes; a holder whose event loop is blocked for longer than ``lease_ttl``
    loses its lease.
    """

    batch_size: int = 1000
    poll_interval: float = 0.5
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    outage_backoff: float = 0.1
    max_outage_backoff: float = 5.0
    failure_backoff: float = 5.0
    conflict_retries: int = 10
    lease_ttl: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 100_000:
            raise InvalidArgument(f"batch_size must be an int in [1, 100000], got {self.batch_size!r}")
        if not isinstance(self.poll_interval, int | float) or not 0.001 <= self.poll_interval <= 3600:
            raise InvalidArgument(
                f"poll_interval must be in [0.001, 3600] seconds, got {self.poll_interval!r}"
            )
        if not isinstance(self.retry, RetryPolicy):
            raise InvalidArgument(f"retry must be a RetryPolicy, got {self.retry!r}")
        for name in ("outage_backoff", "max_outage_backoff", "failure_backoff"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 3600:
                raise InvalidArgument(f"{name} must be in [0, 3600] seconds, got {value!r}")
        if not isinstance(self.conflict_retries, int) or not 1 <= self.conflict_retries <= 1000:
            raise InvalidArgument(
                f"conflict_retries must be an int in [1, 1000], got {self.conflict_retries!r}"
            )
        ttl = self.lease_ttl
        if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0.1 <= ttl <= 3600:
            raise InvalidArgument(f"lease_ttl must be in [0.1, 3600] seconds, got {ttl!r}")


class RunnerBlocked(TidingsError):
    """The runner cannot go on until someone acts (a projection whose code changed needs a
    rebuild). It reports ``state="failed"`` with this error, processes nothing, and checks again
    every ``failure_backoff`` seconds."""


@dataclasses.dataclass(frozen=True, slots=True)
class SubscriptionStats:
    """A subscription's observable state (rendered by the CLI and the console)."""

    group: str
    state: State
    checkpoint: int
    head: int
    lag: int
    in_flight: int
    handled: int
    skipped_duplicates: int
    retries: int
    dead_lettered: int
    last_error: str | None


class Subscription(abc.ABC):
    """Runs one group over the log until :meth:`stop` is called.

    Subclasses implement :meth:`process_batch`. ``run()`` waits as a hot standby while another
    runner of the same group is active in this process.
    """

    def __init__(
        self,
        store: TrackingStore,
        group: str,
        *,
        event_types: Sequence[str] | None = None,
        stream_prefix: str | None = None,
        config: SubscriptionConfig | None = None,
    ) -> None:
        self.store = store
        self.group = group
        self.event_types = None if event_types is None else tuple(event_types)
        self.stream_prefix = stream_prefix
        self.config = config or SubscriptionConfig()
        self.checkpoint = 0
        self.head = 0
        self._report = asyncio.Event()  # the state changed in a way the lease row should show now
        self._state: State = "idle"
        self.in_flight = 0
        self.handled = 0
        self.skipped_duplicates = 0
        self.retries = 0
        self.dead_lettered = 0
        self.last_error: str | None = None
        self._stopping = asyncio.Event()  # stop() was called
        self._halt = asyncio.Event()  # stop() was called, or the lease was lost
        self._lease: Lease | None = None
        self._failing = False  # the last attempt to work failed (a bug, a projection to rebuild)
        self._poisoned = False
        self._prefetch: tuple[int, asyncio.Future[tuple[list[RecordedEvent], int]]] | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """What the runner is doing (see :class:`SubscriptionStats`)."""
        return self._state

    @state.setter
    def state(self, value: State) -> None:
        # Failing, or recovering, is reported to the lease row at once, not at the next heartbeat.
        if (value == "failed") != (self._state == "failed"):
            self._report.set()
        self._state = value

    def stop(self) -> None:
        """Ask the runner to finish the event in hand, commit, and return from :meth:`run`."""
        self._stopping.set()
        self._halt.set()

    @property
    def stopping(self) -> bool:
        """True once the runner must not start another event: it was asked to stop, or it no
        longer holds its group's lease (checked before every handler call)."""
        return self._halt.is_set() or (self._lease is not None and not self._lease.held)

    @property
    def lease_name(self) -> str:
        """The name of the lease this runner holds across processes (its group by default)."""
        return self.group

    def statistics(self) -> SubscriptionStats:
        return SubscriptionStats(
            self.group,
            self.state,
            self.checkpoint,
            self.head,
            max(0, self.head - self.checkpoint),
            self.in_flight,
            self.handled,
            self.skipped_duplicates,
            self.retries,
            self.dead_lettered,
            self.last_error,
        )

    async def run(self) -> None:
        """Process events until stopped; returns after the last commit.

        Waits as a standby while another runner of the group is active, in this process (the
        group lock) or in another one (the group's lease); a runner that loses its lease stops
        before its next handler call and becomes a standby again. A graceful stop releases the
        lease, so that a standby takes over at once. Store errors and bugs do not end the
        runner: they are logged, shown in :meth:`statistics` (``last_error``;
        ``state="failed"`` for bugs), and retried.
        """
        self.state = "standby"
        lock = self.store.group_lock(self.group)
        if not await self._acquire_unless_stopped(lock):
            self.state = "stopped"
            return
        lease = Lease(self.store, self.lease_name, self.config.lease_ttl)
        try:
            while await self._await_lease(lease):
                self._lease = lease
                keeper = asyncio.create_task(self._keep_lease(lease), name=f"tidings:lease:{self.group}")
                try:
                    await self._run_locked()
                finally:
                    keeper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await keeper
                    self._drop_prefetch()
                    self._lease = None
                if self._stopping.is_set():
                    break
                log.warning(
                    "subscription %r: lost its lease (held by another runner, or not renewed in "
                    "time); standing by",
                    self.group,
                )
                self.state = "standby"
                self._halt.clear()
        finally:
            self._lease = None
            if not self._stopping.is_set():
                self._halt.clear()
            if lease.held:
                try:
                    await lease.release()
                except TidingsError as exc:
                    log.warning("subscription %r: could not release its lease: %s", self.group, exc)
            lock.release()
            self.state = "stopped"

    async def _await_lease(self, lease: Lease) -> bool:
        """Stand by until ``lease`` is ours (True) or the runner is asked to stop (False)."""
        interval = min(self.config.poll_interval, lease.ttl / 4)
        outages = 0
        while not self._stopping.is_set():
            try:
                # A runner that is failing itself does not take the group from another failing one.
                if await lease.acquire(preempt_failed=not self._failing):
                    return True
                outages = 0
                self.state = "standby"
                await self.pause(interval)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                if is_transient(exc):
                    outages += 1
                    log.warning("subscription %r: store unavailable while standing by: %s", self.group, exc)
                    await self.pause(self.outage_delay(outages))
                else:
                    self.state = "failed"
                    log.error("subscription %r: cannot take its lease", self.group, exc_info=exc)
                    await self.pause(self.config.failure_backoff)
        return False

    async def _keep_lease(self, lease: Lease) -> None:
        """Renew ``lease`` every ``ttl / 3`` seconds, reporting the runner's state with it.

        When it is lost (another holder has it, or no renewal succeeded in time) the runner is
        halted: it starts no other event, and its waits end at once.
        """
        interval = lease.ttl / 3
        while lease.held:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report.wait(), min(interval, lease.remaining))
            self._report.clear()
            if not lease.held:
                break
            # Never cancelled midway: a renewal that is slow (a busy database) is waited for only
            # as long as the lease lasts; the runner halts then, and the renewal is let finish.
            renewal = asyncio.ensure_future(lease.renew(self.state, self.last_error))
            done, _ = await asyncio.wait({renewal}, timeout=lease.remaining)
            if not done:
                lease.lose()
                self._halt.set()
                with contextlib.suppress(Exception):
                    await renewal
                return
            try:
                if not renewal.result():
                    log.warning("subscription %r: its lease was taken over by another runner", self.group)
            except Exception as exc:
                log.warning("subscription %r: lease renewal failed: %s", self.group, exc)
        self._halt.set()

    async def _acquire_unless_stopped(self, lock: asyncio.Lock) -> bool:
        """Wait (as a hot standby) for the group's lock; give up if asked to stop meanwhile."""
        acquire = asyncio.ensure_future(lock.acquire())
        stopper = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({acquire, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not acquire.done():
            acquire.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await acquire
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
        acquired = acquire.done() and not acquire.cancelled()
        if acquired and self.stopping:
            lock.release()
            return False
        return acquired

    async def run_until_caught_up(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Process until the checkpoint reaches the head as of the call; return the checkpoint.

        ``progress(checkpoint, target)`` is called after each batch (to show a progress bar)."""
        async with self.store.group_lock(self.group):
            await self.prepare()
            self.checkpoint = await self.store.load_checkpoint(self.group)
            target = await self.store.head()
            try:
                while self.checkpoint < target and not self.stopping:
                    await self._step()
                    if progress is not None:
                        progress(self.checkpoint, target)
            finally:
                self._drop_prefetch()
            return self.checkpoint

    async def prepare(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Hook run once before processing (projections create their tables here)."""

    async def _run_locked(self) -> None:
        # Loading state is inside the guarded loop: a store that is away at start-up, or after a
        # conflict, is waited for like any other store error instead of ending the runner.
        hook: Callable[[], Awaitable[None]] | None = self.prepare
        reload = True
        outages = 0
        while not self.stopping:
            try:
                if hook is not None:
                    await hook()
                    hook = None
                if reload:
                    self.checkpoint = await self.store.load_checkpoint(self.group)
                    reload = False
                    self.state = "catching up"
                progressed = await self._step()
                await self.housekeeping(idle=not progressed)
                if not progressed:
                    self.state = "live"
                    if await self._idle():
                        log.info("subscription %r: checkpoint was moved; resuming from it", self.group)
                        self._drop_prefetch()
                        reload = True
                outages = 0
                self._failing = False
            except RunnerBlocked as exc:
                # Waiting for an operator (a rebuild): say so once, not with a traceback per try.
                self._drop_prefetch()
                if self.state != "failed" or self.last_error != str(exc):
                    log.error("subscription %r: %s", self.group, exc)
                self.state = "failed"
                self.last_error = str(exc)
                self._failing = True
                await self.pause(self.config.failure_backoff)
                reload = True
            except CheckpointConflict as exc:
                # Another runner of this group committed first, or the checkpoint was reset by
                # hand: resume from the stored checkpoint.
                log.info("%s", exc)
                self._drop_prefetch()
                hook, reload = self.on_conflict, True
            except BaseException as exc:
                if not handler_failure(exc):
                    raise  # our own task is being cancelled
                self._drop_prefetch()
                self.last_error = f"{type(exc).__name__}: {exc}"
                if is_transient(exc):
                    # The store is away (a restart, a lock held too long): wait for it; the
                    # checkpoint still marks what is done.
                    outages += 1
                    log.warning("subscription %r: store unavailable: %s", self.group, exc)
                    await self.pause(self.outage_delay(outages))
                else:
                    # A bug, or a store that refuses our own statements: never die silently.
                    # Report it in statistics() and the log, and retry after a pause.
                    self.state = "failed"
                    self._failing = True
                    log.error(
                        "subscription %r failed; retrying in %.1fs",
                        self.group,
                        self.config.failure_backoff,
                        exc_info=exc,
                    )
                    await self.pause(self.config.failure_backoff)
                reload = True

    def outage_delay(self, outages: int) -> float:
        """The pause after the ``outages``-th store outage in a row (doubling, bounded)."""
        config = self.config
        return float(min(config.max_outage_backoff, config.outage_backoff * 2 ** min(outages - 1, 30)))

    async def on_conflict(self) -> None:  # noqa: B027 - an optional hook, empty by default
        """Hook: called after a checkpoint conflict, before the checkpoint is reloaded."""

    async def housekeeping(self, *, idle: bool) -> None:  # noqa: B027 - optional, empty by default
        """Hook: called after each step (``idle`` when there was nothing new), e.g. to prune."""

    async def _idle(self) -> bool:
        """Wait, with nothing to do, for an append past the checkpoint, a stop, or the stored
        checkpoint moving (a reset or replay by hand, here or in another process): True for the last.

        One waiter watches the head for the whole idle spell: the store wakes it on every append,
        its own at once and other processes' through its change detection (SQLite's
        ``data_version`` watch, PostgreSQL's LISTEN/NOTIFY and head poll). So the runner itself
        only reads its stored checkpoint each ``poll_interval``; polling the head too, from every
        subscription, was most of what an idle service cost.
        """
        waiter = asyncio.ensure_future(self.store.wait_for_append(self.checkpoint))
        stopper = asyncio.ensure_future(self._halt.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {waiter, stopper}, timeout=self.config.poll_interval, return_when=asyncio.FIRST_COMPLETED
                )
                if done:
                    return False  # appended, stopping, or the wait failed: the next step tells
                if await self.store.load_checkpoint(self.group) != self.checkpoint:
                    return True
        finally:
            for task in (waiter, stopper):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TidingsError):
                await waiter
            with contextlib.suppress(asyncio.CancelledError):
                await stopper

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if the runner is asked to stop (or loses its lease) meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._halt.wait(), seconds)

    async def _read_batch(self, after: int) -> tuple[list[RecordedEvent], int]:
        # Every position up to ``head`` is committed before the read below starts, so a short
        # read proves the filtered-out ones up to it. A head this process saw committed (the
        # wake-up of a live runner carries it) spares a database round trip.
        head = self.store.known_head()
        if head <= after:
            head = await self.store.head()
        try:
            recent = None
            if head - after <= self.config.batch_size:
                # Live: what was just appended in this process is still in memory.
                recent = self.store.read_recent(
                    after,
                    head,
                    event_types=self.event_types,
                    stream_prefix=self.stream_prefix,
                    raw_unknown=True,
                )
            events = recent if recent is not None else await self._read(after, self.config.batch_size)
        except (EventTypeError, SerializationError):
            self._poisoned = True
            # Some stored event no longer decodes (a bad upcaster, data that no longer
            # validates). Read up to it one by one; it will be dead-lettered when reached.
            events = []
            position = after
            while len(events) < self.config.batch_size:
                try:
                    one = await self._read(position, 1)
                except (EventTypeError, SerializationError):
                    break
                if not one:
                    break
                events.extend(one)
                position = one[0].position
            return events, min(head, position) if len(events) < self.config.batch_size else head
        return events, head

    async def _read(self, after: int, limit: int) -> list[RecordedEvent]:
        return [
            e
            async for e in self.store.read_all(
                after=after,
                event_types=self.event_types,
                stream_prefix=self.stream_prefix,
                limit=limit,
                raw_unknown=True,
            )
        ]

    async def _park_undecodable(self) -> bool:
        """Dead-letter the event right after the checkpoint if it cannot be decoded.

        Returns True if one was parked (the checkpoint moved past it).
        """
        try:
            await self._read(self.checkpoint, 1)
        except (EventTypeError, SerializationError) as exc:
            stored = [
                s
                async for s in self.store.read_all_stored(
                    after=self.checkpoint,
                    event_types=self.event_types,
                    stream_prefix=self.stream_prefix,
                    limit=1,
                )
            ]
            if not stored:
                return False
            position = stored[0].position
            record = DeadLetterRecord(
                position,
                stored[0].event_id,
                stored[0].stream_id,
                stored[0].event_type,
                f"{type(exc).__name__}: {exc}",
                "".join(traceback.format_exception(exc)),
                1,
            )
            self.last_error = record.error
            log.error(
                "subscription %r: dead-lettering undecodable event at %d: %s", self.group, position, exc
            )
            await self.commit_patiently(position, dead_letters=[record], work=self.park_work())
            self.dead_lettered += 1
            return True
        return False

    def park_work(self) -> WorkFn | None:
        """Work to run with a commit that only parks an event (projections check their generation)."""
        return None

    async def _step(self) -> bool:
        """Read one batch after the checkpoint and process it. False if there was nothing new.

        While catching up, the next batch is read while this one commits (the reader and the
        writer are different threads), which is most of the catch-up speed.
        """
        prefetched, self._prefetch = self._prefetch, None
        if prefetched is not None and prefetched[0] == self.checkpoint:
            events, head = await prefetched[1]
        else:
            if prefetched is not None:
                prefetched[1].cancel()
            events, head = await self._read_batch(self.checkpoint)
        self.head = max(self.head, head)
        full = len(events) == self.config.batch_size
        # A short batch means the scan reached the head read above: filtered-out events up to it
        # count as processed, so wait_for() on their positions returns too.
        scanned = events[-1].position if full else max(head, events[-1].position if events else 0)
        if scanned <= self.checkpoint:
            if self._poisoned:
                self._poisoned = False
                return await self._park_undecodable()
            return False
        if full:
            task = asyncio.ensure_future(self._read_batch(scanned))
            self._prefetch = (scanned, task)
        self.state = "catching up" if scanned < self.head else self.state
        try:
            await self.process_batch(events, scanned)
        except BaseException:
            self._drop_prefetch()
            raise
        # Truthful state: at the head we are live, not "catching up" at lag 0.
        self.state = "catching up" if self.checkpoint < self.head else "live"
        return True

    def _drop_prefetch(self) -> None:
        if self._prefetch is not None:
            task = self._prefetch[1]
            task.cancel()
            # Retrieve its outcome so that a failed read is not reported as never retrieved.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            self._prefetch = None

    async def retry_dead_letter(self, dead: DeadLetter) -> bool:
        """Process a parked event of this group once more; on success remove it, atomically.

        Returns True if it was handled (and removed), False if it failed again (it stays parked,
        with the new error). Safe while the group's runner is live elsewhere: the commit is
        guarded by the checkpoint and simply retried on a conflict.
        """
        await self.prepare()
        if dead.group != self.group:
            raise InvalidArgument(
                f"dead letter {dead.id} belongs to group {dead.group!r}, not {self.group!r}"
            )
        found = [e async for e in self.store.read_all(after=dead.position - 1, limit=1)]
        if not found or found[0].event_id != dead.event_id:
            raise InvalidArgument(f"dead letter {dead.id}: event {dead.event_id} is no longer in the log")
        for _ in range(self.config.conflict_retries):
            self.checkpoint = await self.store.load_checkpoint(self.group)
            try:
                return await self.reprocess(found[0], dead.id)
            except CheckpointConflict:
                continue
        raise TidingsError(f"dead letter {dead.id}: the group's checkpoint kept moving; try again")

    @abc.abstractmethod
    async def reprocess(self, recorded: RecordedEvent, dead_letter_id: int) -> bool:
        """Handle one parked event once (no backoff) and remove its dead letter if it succeeds."""

    @abc.abstractmethod
    async def process_batch(self, events: list[RecordedEvent], scanned_to: int) -> None:
        """Process ``events`` (all after the checkpoint) and commit the checkpoint ``scanned_to``.

        Must advance ``self.checkpoint`` to ``scanned_to`` unless stopping midway.
        """

    # -- shared commit helpers ------------------------------------------------------------------------

    async def commit(
        self,
        checkpoint: int,
        *,
        contexts: Sequence[HandlerContext] = (),
        dead_letters: Sequence[DeadLetterRecord] = (),
        remove_dead_letter: int | None = None,
        work: WorkFn | None = None,
    ) -> None:
        """Commit effects with the new checkpoint, once; raises what the store raised.

        Inbox rows are written only for handled events beyond the new checkpoint (committed ahead
        of an earlier event that must run again): the checkpoint already proves the others done.
        """
        if work is None:
            work = statements_work(contexts)
        new_checkpoint = max(checkpoint, self.checkpoint)
        batch = ProcessedBatch(
            group=self.group,
            expected_checkpoint=self.checkpoint,
            checkpoint=new_checkpoint,
            work=work,
            appends=tuple(a for ctx in contexts for a in ctx.appends),
            processed=tuple(
                (c.recorded.event_id, c.recorded.position)
                for c in contexts
                if c.recorded.position > new_checkpoint
            ),
            dead_letters=tuple(dead_letters),
            remove_dead_letter=remove_dead_letter,
        )
        await self.store.commit_processed(batch)
        self.checkpoint = batch.checkpoint

    async def commit_patiently(
        self,
        checkpoint: int,
        *,
        contexts: Sequence[HandlerContext] = (),
        dead_letters: Sequence[DeadLetterRecord] = (),
        remove_dead_letter: int | None = None,
        work: WorkFn | None = None,
    ) -> None:
        """:meth:`commit`, waiting out store outages and trying the same commit again (the
        handlers do not run again). While stopping, an outage is raised instead."""
        outages = 0
        while True:
            try:
                await self.commit(
                    checkpoint,
                    contexts=contexts,
                    dead_letters=dead_letters,
                    remove_dead_letter=remove_dead_letter,
                    work=work,
                )
                return
            except TidingsError as exc:
                if not is_transient(exc) or self.stopping:
                    raise
                outages += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("subscription %r: commit waits for the store: %s", self.group, exc)
                await self.pause(self.outage_delay(outages))

    def dead_letter_record(
        self, recorded: RecordedEvent, exc: BaseException, attempts: int
    ) -> DeadLetterRecord:
        tracing.dead_lettered(recorded, self.group, attempts, exc)
        return DeadLetterRecord(
            recorded.position,
            recorded.event_id,
            recorded.stream_id,
            recorded.event_type,
            f"{type(exc).__name__}: {exc}",
            "".join(traceback.format_exception(exc)),
            attempts,
        )
