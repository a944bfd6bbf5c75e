"""The bus contract suite: one abstract test class, subclassed once per bus backend.

To certify a backend, subclass :class:`BusContract` and implement :meth:`BusContract.make_bus` to
return an **opened** bus on which no other test's services or groups exist::

    class TestMyBus(BusContract):
        async def make_bus(self) -> Bus:
            return await open_bus("mine://...").open()

Requires pytest and pytest-asyncio (``asyncio_mode = "auto"``). The tests wait on conditions with a
timeout (:attr:`BusContract.timeout`), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime

import orjson
import pytest

from tidings.bus import (
    Bus,
    ConsumerGroup,
    DeadLetter,
    DeliveryPolicy,
    IncomingMessage,
    InvalidMessageData,
    NotACloudEvent,
    UnknownMessageType,
)
from tidings.errors import InvalidArgument, StoreUnavailable
from tidings.events import Event, RecordedEvent
from tidings.testing.events import Credited, Debited

__all__ = ["BusContract", "Recorder", "envelopes"]

FAST = DeliveryPolicy(max_deliver=3, backoff=(0.05, 0.1), ack_wait=10.0, transient_backoff=0.1)


def envelopes(
    stream_id: str,
    count: int,
    *,
    start: int = 1,
    event: Callable[[int], Event] = lambda v: Credited(amount=v),
    metadata: dict[str, str] | None = None,
) -> list[RecordedEvent]:
    """``count`` recorded events of ``stream_id`` with versions ``start..``, as a store would return."""
    now = datetime.now(UTC)
    return [
        RecordedEvent(
            event_id=uuid.uuid4(),
            event_type=type(e).__event_type__,
            stream_id=stream_id,
            version=v,
            position=v,
            timestamp=now,
            event=e,
            metadata=metadata or {},
            schema_version=type(e).__event_version__,
        )
        for v in range(start, start + count)
        for e in [event(v)]
    ]


class Recorder:
    """Collects what a consumer group receives; tests wait on its conditions."""

    def __init__(self) -> None:
        self.messages: list[IncomingMessage] = []
        self.dead: list[DeadLetter] = []
        self.failures: dict[uuid.UUID, int] = {}
        self.fail: Callable[[IncomingMessage], BaseException | None] = lambda m: None
        self.changed = asyncio.Condition()

    async def handle(self, message: IncomingMessage) -> None:
        error = self.fail(message)
        if error is not None:
            self.failures[message.event_id] = self.failures.get(message.event_id, 0) + 1
            raise error
        # Yield once so that concurrent partitions interleave, as real handlers would.
        await asyncio.sleep(0)
        async with self.changed:
            self.messages.append(message)
            self.changed.notify_all()

    async def dead_letter(self, letter: DeadLetter) -> None:
        async with self.changed:
            self.dead.append(letter)
            self.changed.notify_all()

    async def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        async def waiting() -> None:
            async with self.changed:
                await self.changed.wait_for(condition)

        try:
            await asyncio.wait_for(waiting(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}: {len(self.messages)} messages, "
                f"{len(self.dead)} dead letters {[d.reason for d in self.dead]}"
            ) from None

    def versions(self, stream_id: str) -> list[int | None]:
        return [m.stream_version for m in self.messages if m.stream_id == stream_id]


class BusContract:
    """Behaviour every :class:`~tidings.bus.Bus` backend must have."""

    timeout: float = 30.0
    """Seconds any single wait of the suite may take before the test fails."""

    async def make_bus(self) -> Bus:
        """Return an opened bus with no services or groups of other tests. Subclasses implement this."""
        raise NotImplementedError

    @pytest.fixture
    async def bus(self) -> AsyncIterator[Bus]:
        bus = await self.make_bus()
        try:
            yield bus
        finally:
            await bus.close()

    async def consume(
        self, bus: Bus, recorder: Recorder, types: Iterable[str | type[Event]] = (), name: str = "g"
    ) -> None:
        group = ConsumerGroup("shipping", name, {"orders": list(types)}, FAST)
        await bus.consume(group, recorder.handle, recorder.dead_letter)

    # -- publish and consume ----------------------------------------------------------------------

    async def test_publish_and_consume(self, bus: Bus) -> None:
        meta = {
            "correlation_id": "corr-1",
            "causation_id": "cause-1",
            "traceparent": "00-" + "a" * 32 + "-01",
        }
        a = envelopes("order-a", 3, metadata=meta)
        b = envelopes("order-b", 2)
        result = await bus.publish("orders", a + b)
        assert (result.published, result.duplicates) == (5, 0)
        recorder = Recorder()
        await self.consume(bus, recorder)
        await recorder.wait_for(lambda: len(recorder.messages) == 5, self.timeout, "5 messages")
        got = {m.event_id: m for m in recorder.messages}
        for sent in a + b:
            message = got[sent.event_id]
            assert message.event == sent.event
            assert message.event_type == "tidings.testing.Credited"
            assert (message.stream_id, message.stream_version) == (sent.stream_id, sent.version)
            assert message.service == "orders" and message.attempt == 1
            assert message.time is not None
        first = got[a[0].event_id]
        assert first.correlation_id == "corr-1" and first.causation_id == "cause-1"
        assert first.metadata["traceparent"] == meta["traceparent"]

    async def test_consumes_events_published_later(self, bus: Bus) -> None:
        recorder = Recorder()
        await self.consume(bus, recorder)
        await bus.publish("orders", envelopes("order-a", 2))
        await recorder.wait_for(lambda: len(recorder.messages) == 2, self.timeout, "2 messages")

    async def test_groups_filter_by_event_type_and_each_get_everything(self, bus: Bus) -> None:
        mixed = envelopes("order-a", 4, event=lambda v: Credited(amount=v) if v % 2 else Debited(amount=v))
        await bus.publish("orders", mixed)
        credits, everything = Recorder(), Recorder()
        await self.consume(bus, credits, [Credited], name="credits")
        await self.consume(bus, everything, name="all")
        await everything.wait_for(lambda: len(everything.messages) == 4, self.timeout, "all 4")
        await credits.wait_for(lambda: len(credits.messages) == 2, self.timeout, "2 credits")
        # A marker after the filtered-out events proves nothing else is on its way to `credits`.
        await bus.publish("orders", envelopes("order-a", 1, start=5))
        await credits.wait_for(lambda: len(credits.messages) == 3, self.timeout, "the marker")
        assert [type(m.event) for m in credits.messages] == [Credited] * 3
        assert credits.versions("order-a") == [1, 3, 5]

    async def test_invalid_names_are_refused(self, bus: Bus) -> None:
        with pytest.raises(InvalidArgument):
            await bus.publish("no spaces", envelopes("s", 1))
        with pytest.raises(InvalidArgument):
            ConsumerGroup("shipping", "g.h", {"orders": []})

    # -- idempotence --------------------------------------------------------------------------------

    async def test_publish_is_idempotent_per_event_id(self, bus: Bus) -> None:
        batch = envelopes("order-a", 3)
        assert (await bus.publish("orders", batch)).published == 3
        again = await bus.publish("orders", batch)
        assert (again.published, again.duplicates) == (0, 3)
        recorder = Recorder()
        await self.consume(bus, recorder)
        await bus.publish("orders", envelopes("order-a", 1, start=4))
        # Version 4 is delivered after 1..3 (order per aggregate), so any duplicate would be in by now.
        await recorder.wait_for(lambda: 4 in recorder.versions("order-a"), self.timeout, "version 4")
        assert recorder.versions("order-a") == [1, 2, 3, 4]
        stats = await bus.statistics()
        assert stats.duplicates >= 3

    # -- order -------------------------------------------------------------------------------------

    async def test_order_per_aggregate_with_several_members(self, bus: Bus) -> None:
        streams = [f"order-{i}" for i in range(12)]
        recorder = Recorder()
        group = ConsumerGroup("shipping", "g", {"orders": []}, FAST)
        await bus.consume(group, recorder.handle, recorder.dead_letter)
        await bus.consume(group, recorder.handle, recorder.dead_letter)
        for start in (1, 6, 11):
            await bus.publish("orders", [e for s in streams for e in envelopes(s, 5, start=start)])
        total = len(streams) * 15
        await recorder.wait_for(lambda: len(recorder.messages) >= total, self.timeout, f"{total} messages")
        for s in streams:
            assert recorder.versions(s) == list(range(1, 16)), s

    # -- retries and dead letters -------------------------------------------------------------------

    async def test_failed_handling_is_redelivered_in_order(self, bus: Bus) -> None:
        recorder = Recorder()
        batch = envelopes("order-a", 3)
        flaky = batch[1].event_id
        recorder.fail = lambda m: (
            RuntimeError("not yet") if m.event_id == flaky and recorder.failures.get(flaky, 0) < 2 else None
        )
        await bus.publish("orders", batch)
        await self.consume(bus, recorder)
        await recorder.wait_for(lambda: len(recorder.messages) == 3, self.timeout, "3 messages")
        assert recorder.versions("order-a") == [1, 2, 3]
        assert recorder.failures[flaky] == 2
        assert [m.attempt for m in recorder.messages] == [1, 3, 1]
        stats = await bus.statistics()
        assert stats.redelivered >= 2 and stats.dead_lettered == 0

    async def test_transient_errors_are_waited_out_without_spending_deliveries(self, bus: Bus) -> None:
        recorder = Recorder()
        batch = envelopes("order-a", 2)
        locked = batch[0].event_id
        recorder.fail = lambda m: (
            StoreUnavailable("database is locked")
            if m.event_id == locked and recorder.failures.get(locked, 0) < FAST.max_deliver + 1
            else None
        )
        await bus.publish("orders", batch)
        await self.consume(bus, recorder)
        await recorder.wait_for(lambda: len(recorder.messages) == 2, self.timeout, "2 messages")
        # More failures than max_deliver, yet no dead letter: a transient error spends no delivery.
        assert recorder.failures[locked] == FAST.max_deliver + 1
        assert recorder.versions("order-a") == [1, 2] and recorder.messages[0].attempt == 1
        assert recorder.dead == []

    async def test_dead_letter_after_max_deliver_then_the_partition_moves_on(self, bus: Bus) -> None:
        recorder = Recorder()
        batch = envelopes("order-a", 3)
        poison = batch[0].event_id
        recorder.fail = lambda m: ValueError("cannot ship to Atlantis") if m.event_id == poison else None
        await bus.publish("orders", batch)
        await self.consume(bus, recorder)
        await recorder.wait_for(lambda: len(recorder.messages) == 2, self.timeout, "the 2 good messages")
        assert recorder.versions("order-a") == [2, 3]
        assert len(recorder.dead) == 1
        letter = recorder.dead[0]
        assert letter.attempts == FAST.max_deliver == recorder.failures[poison]
        assert "ValueError" in letter.reason and "Atlantis" in letter.reason
        assert letter.message is not None and letter.message.event_id == poison
        assert letter.origin == "bus:orders" and letter.subject.endswith(".tidings.testing.Credited")
        assert (await bus.statistics()).dead_lettered == 1

    async def test_permanent_error_is_dead_lettered_at_once(self, bus: Bus) -> None:
        recorder = Recorder()
        batch = envelopes("order-a", 2)
        recorder.fail = lambda m: InvalidArgument("no such product") if m.stream_version == 1 else None
        await bus.publish("orders", batch)
        await self.consume(bus, recorder)
        await recorder.wait_for(
            lambda: len(recorder.messages) == 1 and len(recorder.dead) == 1, self.timeout, "1 + 1 dead"
        )
        assert recorder.dead[0].attempts == 1 and "no such product" in recorder.dead[0].reason

    async def test_failing_dead_letter_handler_keeps_the_message(self, bus: Bus) -> None:
        recorder = Recorder()
        refusals: list[DeadLetter] = []

        async def parking(letter: DeadLetter) -> None:
            if len(refusals) < 1:
                refusals.append(letter)
                raise RuntimeError("dead-letter table locked")
            await recorder.dead_letter(letter)

        await bus.publish_raw("orders", "tidings.testing.Credited", "order-a", b"garbage")
        group = ConsumerGroup("shipping", "g", {"orders": []}, FAST)
        await bus.consume(group, recorder.handle, parking)
        await recorder.wait_for(lambda: len(recorder.dead) == 1, self.timeout, "the parked message")
        assert len(refusals) == 1 and recorder.dead[0].payload == b"garbage"

    async def test_undecodable_messages_are_dead_lettered_and_never_block(self, bus: Bus) -> None:
        key = "order-a"
        ok_ce = orjson.loads(_encode_one(envelopes(key, 1)[0]))
        bad: list[tuple[bytes, type[Exception]]] = [
            (b"\x00not json", NotACloudEvent),
            (b'["a", "list"]', NotACloudEvent),
            (orjson.dumps({k: v for k, v in ok_ce.items() if k != "specversion"}), NotACloudEvent),
            (orjson.dumps({k: v for k, v in ok_ce.items() if k != "id"}), NotACloudEvent),
            (orjson.dumps({**ok_ce, "id": str(uuid.uuid4()), "type": "nobody.Knows"}), UnknownMessageType),
            (
                orjson.dumps({**ok_ce, "id": str(uuid.uuid4()), "data": {"amount": "many"}}),
                InvalidMessageData,
            ),
        ]
        for payload, _ in bad:
            await bus.publish_raw(
                "orders", "tidings.testing.Credited", key, payload, msg_id=str(uuid.uuid4())
            )
        await bus.publish("orders", envelopes(key, 1, start=2))
        recorder = Recorder()
        await self.consume(bus, recorder)
        await recorder.wait_for(
            lambda: len(recorder.messages) == 1 and len(recorder.dead) == len(bad), self.timeout, "all"
        )
        assert recorder.versions(key) == [2]
        for letter, (payload, kind) in zip(recorder.dead, bad, strict=True):
            assert letter.payload == payload
            assert letter.attempts == 1 and letter.message is None
            assert isinstance(letter.error, kind), (letter.error, kind)
            assert letter.reason
        assert "specversion" in recorder.dead[2].reason and "'id'" in recorder.dead[3].reason
        assert "nobody.Knows" in recorder.dead[4].reason and "amount" in recorder.dead[5].reason

    # -- durability of the group's position ---------------------------------------------------------

    async def test_a_group_resumes_where_it_stopped(self, bus: Bus) -> None:
        recorder = Recorder()
        group = ConsumerGroup("shipping", "g", {"orders": []}, FAST)
        member = await bus.consume(group, recorder.handle, recorder.dead_letter)
        await bus.publish("orders", envelopes("order-a", 2))
        await recorder.wait_for(lambda: len(recorder.messages) == 2, self.timeout, "2 messages")
        await member.stop()
        await bus.publish("orders", envelopes("order-a", 2, start=3))
        later = Recorder()
        await bus.consume(group, later.handle, later.dead_letter)
        await later.wait_for(lambda: len(later.messages) == 2, self.timeout, "the 2 new messages")
        assert later.versions("order-a") == [3, 4]

    async def test_statistics(self, bus: Bus) -> None:
        recorder = Recorder()
        await bus.publish("orders", envelopes("order-a", 3))
        await self.consume(bus, recorder)
        await recorder.wait_for(lambda: len(recorder.messages) == 3, self.timeout, "3 messages")

        async def settled() -> bool:
            stats = await bus.statistics()
            return stats.acked == 3 and stats.pending == 0

        for _ in range(int(self.timeout * 20)):
            if await settled():
                break
            await asyncio.sleep(0.05)  # polling the statistics is what this test checks
        stats = await bus.statistics()
        assert (stats.published, stats.delivered, stats.acked, stats.pending) == (3, 3, 3, 0)
        assert len(stats.consumers) == 1 and stats.consumers[0].group == "shipping/g"


def _encode_one(envelope: RecordedEvent) -> bytes:
    from tidings.bus.cloudevents import encode

    return encode(envelope, "orders")
