"""Loading and saving event-sourced aggregates, with time travel and snapshots."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Generic, TypeVar

from tidings.aggregate import Aggregate
from tidings.errors import AggregateNotFound, InvalidArgument, TidingsError
from tidings.events import Event
from tidings.store.append import AppendResult, validate_stream_id
from tidings.store.base import EventStore, Snapshot, validate_position

__all__ = ["Repository"]

A = TypeVar("A", bound=Aggregate)

log = logging.getLogger("tidings.repository")


class Repository(Generic[A]):
    """Loads aggregates of one class from a store and saves their new events.

    ``snapshot_every=N`` writes a snapshot whenever a save crosses a multiple of N versions. The
    snapshot is serialised at once (the state as of that version) and written in the background,
    off the command's critical path; :meth:`flush` waits for pending snapshot writes. A snapshot
    whose schema fingerprint differs from the class's, or that no longer validates, is ignored.
    """

    def __init__(
        self, store: EventStore, aggregate_class: type[A], *, snapshot_every: int | None = None
    ) -> None:
        if not isinstance(store, EventStore):
            raise InvalidArgument(f"Repository needs an EventStore, got {type(store).__qualname__}")
        if not isinstance(aggregate_class, type) or not issubclass(aggregate_class, Aggregate):
            raise InvalidArgument(f"Repository needs an Aggregate subclass, got {aggregate_class!r:.80}")
        if snapshot_every is not None and (
            not isinstance(snapshot_every, int) or isinstance(snapshot_every, bool) or snapshot_every < 1
        ):
            raise InvalidArgument(f"snapshot_every must be an int >= 1, got {snapshot_every!r}")
        self.store = store
        self.aggregate_class = aggregate_class
        self.snapshot_every = snapshot_every
        self._background: set[asyncio.Task[None]] = set()

    async def get(
        self,
        id: str,
        *,
        at_version: int | None = None,
        at_time: datetime | None = None,
        create: bool = False,
    ) -> A:
        """The aggregate as of now, as of ``at_version``, or as of the instant ``at_time``.

        Raises :class:`AggregateNotFound` when the stream has no events (at that version or time),
        unless ``create`` is true: then a new, empty aggregate (version 0) is returned, ready to
        record its first events and be saved (get-or-create; only for the current state).
        A stored event of the aggregate that cannot be read back raises
        :class:`~tidings.CorruptEvent`, :class:`~tidings.UnknownEventType` or
        :class:`~tidings.UpcastError` naming its stream, version and position.
        """
        id = validate_stream_id(id)
        if at_version is not None and at_time is not None:
            raise InvalidArgument("pass at_version or at_time, not both")
        if at_time is not None and not isinstance(at_time, datetime):
            raise InvalidArgument(f"at_time must be an aware datetime, got {type(at_time).__qualname__}")
        if create and (at_version is not None or at_time is not None):
            raise InvalidArgument(
                "create=True loads the current state; it cannot be combined with time travel"
            )
        target = validate_position("at_version", at_version, allow_none=True)
        if at_version == 0:
            raise InvalidArgument("at_version must be >= 1 (version 0 is the empty aggregate)")
        if at_time is not None:
            target = await self.store.version_at(id, at_time)
            if target == 0:
                raise AggregateNotFound(id, f"no events at or before {at_time.isoformat()}")
        aggregate: A | None = None
        snapshot = None
        if self.snapshot_every is not None:
            snapshot = await self.store.load_snapshot(id, max_version=target)
        if snapshot is not None and snapshot.schema == self.aggregate_class.snapshot_schema():
            aggregate = self.aggregate_class.from_snapshot(id, snapshot.version, snapshot.state)
        if aggregate is None:
            aggregate = self.aggregate_class(id)
        start = aggregate.version
        limit = None if target is None else target - start
        apply = aggregate.apply
        version = start
        async for version, event in self.store.stream_events(id, after=start, limit=limit):
            if not isinstance(event, Event):
                raise TidingsError(
                    f"aggregate {id!r}: event type {event.event_type!r} at version "
                    f"{version} is not registered; cannot apply a raw event"
                )
            apply(event)
        aggregate.version = version
        if version == 0:
            if create:
                return aggregate
            raise AggregateNotFound(id)
        if target is not None and version < target:
            raise AggregateNotFound(id, f"it has version {version}, not {target}")
        return aggregate

    async def save(self, aggregate: A, *, metadata: Mapping[str, Any] | None = None) -> AppendResult | None:
        """Append the aggregate's pending events, expecting the version it was loaded at.

        Returns the append's result (None if nothing was pending). Raises
        :class:`~tidings.ConcurrencyError` if another writer got there first; the aggregate keeps
        its pending events, and the caller may reload and retry the command.
        """
        if not isinstance(aggregate, self.aggregate_class):
            raise InvalidArgument(
                f"this repository saves {self.aggregate_class.__name__} aggregates, got "
                f"{type(aggregate).__qualname__}"
            )
        pending = aggregate.pending_events
        if not pending:
            return None
        base = aggregate.version - len(pending)
        result = await self.store.append(aggregate.id, pending, expected_version=base, metadata=metadata)
        aggregate.mark_saved()
        every = self.snapshot_every
        if every is not None and result.version // every > base // every:
            self._snapshot_later(aggregate)
        return result

    def _snapshot_later(self, aggregate: A) -> None:
        try:
            state = aggregate.snapshot_state()
        except TidingsError:
            log.exception("snapshot of %r skipped", aggregate)
            return
        snapshot = Snapshot(
            aggregate.id,
            aggregate.version,
            self.aggregate_class.__aggregate_type__,
            self.aggregate_class.snapshot_schema(),
            state,
        )
        task = asyncio.get_running_loop().create_task(self._write_snapshot(snapshot))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write_snapshot(self, snapshot: Snapshot) -> None:
        try:
            await self.store.save_snapshot(snapshot)
        except TidingsError:
            # A lost snapshot costs only a longer replay; it must not fail the command.
            log.exception("writing snapshot of %r at version %d failed", snapshot.stream_id, snapshot.version)

    async def snapshot(self, id: str) -> Snapshot:
        """Load the aggregate and write a snapshot of its current state now."""
        aggregate = await self.get(id)
        snapshot = Snapshot(
            id,
            aggregate.version,
            self.aggregate_class.__aggregate_type__,
            self.aggregate_class.snapshot_schema(),
            aggregate.snapshot_state(),
        )
        await self.store.save_snapshot(snapshot)
        return snapshot

    async def flush(self) -> None:
        """Wait until every snapshot write started by :meth:`save` has finished."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
