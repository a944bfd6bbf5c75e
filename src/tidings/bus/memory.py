"""The in-process bus (``memory://``): services of one process, each owning a store, and tests.

Same semantics as the NATS bus, by the same code path for decoding, retries and dead letters
(:func:`tidings.bus.base.handle_batch`): messages are stored as CloudEvent bytes per publishing
service and partition; de-duplication by event id (for the life of the bus, not a time window);
per consumer group and partition one batch in flight (what the partition holds, up to
``max_batch``), handled in order, so per-aggregate order holds; a failed message is retried after
its back-off, then dead-lettered. The members of a group share its
partitions round-robin (partition ``p`` goes to member ``p mod n``), re-dealt when one joins or
leaves. Nothing survives the process: durability is the publishing store's (the outbox).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterable

from tidings.bus.base import (
    BatchHandler,
    Bus,
    BusStatistics,
    Consumer,
    ConsumerGroup,
    ConsumerStatistics,
    Counters,
    DeadLetterHandler,
    Delivery,
    PublishResult,
    SetupAction,
    check_event_type,
    check_name,
    handle_batch,
    partition_of,
    registry_or_default,
)
from tidings.bus.cloudevents import encode
from tidings.bus.errors import BusClosed, BusConfigError
from tidings.events import EventRegistry, RecordedEvent

__all__ = ["MemoryBus"]

DEFAULT_PARTITIONS = 8


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    event_type: str
    payload: bytes


class _Partition:
    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.appended = asyncio.Event()

    def append(self, entry: _Entry) -> None:
        self.entries.append(entry)
        self.wake()

    def wake(self) -> None:
        """Wake every waiting worker (an append, or a group stopping), then arm a fresh event."""
        self.appended.set()
        self.appended = asyncio.Event()


class _Member(Consumer):
    def __init__(self, state: _GroupState, handler: BatchHandler, dead_letter: DeadLetterHandler) -> None:
        self.group = state.group
        self.member = uuid.uuid4().hex
        self.state = state
        self.handler = handler
        self.dead_letter = dead_letter
        self.counters = Counters()
        self.stopped = False

    async def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        await self.state.leave(self)

    def statistics(self) -> ConsumerStatistics:
        held = tuple(key for key in self.state.workers if self.state.member_for(key[1]) is self)
        c = self.counters
        return ConsumerStatistics(
            self.group.label, self.member, c.delivered, c.acked, c.redelivered, c.dead_lettered, held
        )


class _GroupState:
    """A group's durable position (per source and partition) and its live members."""

    def __init__(self, bus: MemoryBus, group: ConsumerGroup, registry: EventRegistry) -> None:
        self.bus = bus
        self.group = group
        self.registry = registry
        self.cursors: dict[tuple[str, int], int] = {}
        self.members: list[_Member] = []
        self.workers: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.stopping = asyncio.Event()
        self.membership_changed = asyncio.Event()

    def member_for(self, partition: int) -> _Member | None:
        if not self.members:
            return None
        return self.members[partition % len(self.members)]

    def join(self, member: _Member) -> None:
        self.members.append(member)
        self._changed()
        if not self.workers:
            self.stopping = asyncio.Event()
            for source in self.group.sources:
                for p in range(self.bus.partitions):
                    task = asyncio.create_task(
                        self._work(source, p), name=f"bus {self.group.label} {source}/{p}"
                    )
                    self.workers[(source, p)] = task

    async def leave(self, member: _Member) -> None:
        self.members.remove(member)
        self._changed()
        if not self.members:
            # The last member leaves: workers finish the batch in hand, then end.
            self.stopping.set()
            for source, p in self.workers:
                self.bus.partition(source, p).wake()
            workers = list(self.workers.values())
            self.workers.clear()
            await asyncio.gather(*workers, return_exceptions=True)

    def _changed(self) -> None:
        self.membership_changed.set()
        self.membership_changed = asyncio.Event()

    def pending(self) -> int:
        total = 0
        for source in self.group.sources:
            for p in range(self.bus.partitions):
                entries = self.bus.partition(source, p).entries
                cursor = self.cursors.get((source, p), 0)
                total += sum(1 for e in entries[cursor:] if self.group.accepts(source, e.event_type))
        return total

    async def _work(self, source: str, p: int) -> None:
        key = (source, p)
        part = self.bus.partition(source, p)
        stopping = self.stopping
        while not stopping.is_set():
            cursor = self.cursors.get(key, 0)
            if cursor >= len(part.entries):
                # One wait, no task: stopping wakes the partition too (see leave()).
                await part.appended.wait()
                continue
            # The batch: up to max_batch accepted entries from the cursor; ends[i] is the cursor
            # after the i-th of them (entries of other types in between are passed over).
            batch: list[Delivery] = []
            ends: list[int] = []
            scan = cursor
            limit = self.group.delivery.max_batch
            while scan < len(part.entries) and len(batch) < limit:
                entry = part.entries[scan]
                scan += 1
                if self.group.accepts(source, entry.event_type):
                    batch.append(Delivery(f"{source}.{p}.{entry.event_type}", entry.payload, 1))
                    ends.append(scan)
            if not batch:
                self.cursors[key] = scan
                continue
            member = self.member_for(p)
            if member is None:
                return
            outcomes = await handle_batch(
                group=self.group,
                origin=f"bus:{source}",
                deliveries=batch,
                registry=self.registry,
                handler=member.handler,
                dead_letter=member.dead_letter,
                counters=member.counters,
                stopping=stopping,
            )
            if outcomes:
                self.cursors[key] = scan if len(outcomes) == len(batch) else ends[len(outcomes) - 1]


class MemoryBus(Bus):
    """The in-process bus. ``partitions`` per publishing service (default 8)."""

    def __init__(self, url: str = "memory://", *, partitions: int = DEFAULT_PARTITIONS) -> None:
        if partitions < 1:
            raise BusConfigError(f"partitions must be >= 1, got {partitions}")
        self.url = url
        self.partitions = partitions
        self._logs: dict[tuple[str, int], _Partition] = {}
        self._seen: dict[str, set[str]] = {}
        self._groups: dict[tuple[str, str], _GroupState] = {}
        self._members: list[_Member] = []
        self._published = 0
        self._duplicates = 0
        self._open = False
        self._closed = False

    async def open(self) -> MemoryBus:
        if self._closed:
            raise BusClosed("this memory bus was closed; open a new one")
        self._open = True
        return self

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.gather(*(m.stop() for m in list(self._members)))

    def partition(self, service: str, p: int) -> _Partition:
        part = self._logs.get((service, p))
        if part is None:
            part = self._logs[(service, p)] = _Partition()
        return part

    def _check_open(self) -> None:
        if self._closed:
            raise BusClosed("the bus is closed")
        if not self._open:
            raise BusClosed("the bus is not open: use 'async with bus' or 'await bus.open()'")

    async def publish(self, service: str, envelopes: Iterable[RecordedEvent]) -> PublishResult:
        self._check_open()
        check_name("service", service)
        published = duplicates = 0
        for envelope in envelopes:
            check_event_type(envelope.event_type)
            stored = self._append(
                service,
                envelope.event_type,
                envelope.stream_id,
                encode(envelope, service),
                str(envelope.event_id),
            )
            if stored:
                published += 1
            else:
                duplicates += 1
        return PublishResult(published, duplicates)

    async def publish_raw(
        self, service: str, event_type: str, key: str, payload: bytes, *, msg_id: str | None = None
    ) -> bool:
        self._check_open()
        check_name("service", service)
        check_event_type(event_type)
        return self._append(service, event_type, key, payload, msg_id)

    def _append(self, service: str, event_type: str, key: str, payload: bytes, msg_id: str | None) -> bool:
        seen = self._seen.setdefault(service, set())
        if msg_id is not None:
            if msg_id in seen:
                self._duplicates += 1
                return False
            seen.add(msg_id)
        self.partition(service, partition_of(key, self.partitions)).append(_Entry(event_type, payload))
        self._published += 1
        return True

    async def consume_batches(
        self,
        group: ConsumerGroup,
        handler: BatchHandler,
        dead_letter: DeadLetterHandler,
        *,
        registry: EventRegistry | None = None,
    ) -> Consumer:
        self._check_open()
        key = (group.service, group.name)
        state = self._groups.get(key)
        if state is None:
            state = self._groups[key] = _GroupState(self, group, registry_or_default(registry))
        elif state.group.sources != group.sources:
            # Like a durable consumer, the group keeps its positions; its sources may change.
            state.group = group
        member = _Member(state, handler, dead_letter)
        self._members.append(member)
        state.join(member)
        return member

    async def setup(
        self, publishing: Iterable[str] = (), groups: Iterable[ConsumerGroup] = ()
    ) -> list[SetupAction]:
        """Check the names; the in-process bus keeps its state in memory, so nothing is created."""
        for service in publishing:
            check_name("service", service)
        return []

    async def statistics(self) -> BusStatistics:
        consumers = tuple(m.statistics() for m in self._members if not m.stopped)
        all_counters = [m.counters for m in self._members]
        return BusStatistics(
            published=self._published,
            duplicates=self._duplicates,
            delivered=sum(c.delivered for c in all_counters),
            acked=sum(c.acked for c in all_counters),
            redelivered=sum(c.redelivered for c in all_counters),
            dead_lettered=sum(c.dead_lettered for c in all_counters),
            pending=sum(state.pending() for state in self._groups.values()),
            consumers=consumers,
        )
