"""The event store contract suite: one abstract test class, subclassed once per backend.

To certify a backend, subclass :class:`StoreContract` in a test module and implement
:meth:`StoreContract.make_store` to return an **opened, empty** store::

    class TestMyStore(StoreContract):
        async def make_store(self, tmp_path):
            return await open_store(f"mine://{tmp_path}/x").open()

Requires pytest and pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tidings.errors import (
    ConcurrencyError,
    DuplicateEventId,
    InvalidArgument,
    InvalidStreamId,
    SerializationError,
    StoreClosed,
    UnknownEventType,
    UpcastError,
)
from tidings.events import Event, EventRegistry, RawEvent, RecordedEvent
from tidings.store.append import ANY, NO_STREAM, STREAM_EXISTS
from tidings.store.base import EventStore, Snapshot
from tidings.testing.events import Credited, Debited, Noted, Opaque

__all__ = ["StoreContract", "collect"]


async def collect(iterator: AsyncIterator[RecordedEvent]) -> list[RecordedEvent]:
    """Drain an async iterator of recorded events into a list."""
    return [item async for item in iterator]


def credits(*amounts: int) -> list[Event]:
    return [Credited(amount=a) for a in amounts]


class StoreContract:
    """Behaviour every :class:`~tidings.store.EventStore` backend must have."""

    async def make_store(self, tmp_path: Path) -> EventStore:
        """Return an opened, empty store. Subclasses implement this."""
        raise NotImplementedError

    @pytest.fixture
    async def store(self, tmp_path: Path) -> AsyncIterator[EventStore]:
        store = await self.make_store(tmp_path)
        try:
            yield store
        finally:
            await store.close()

    async def snapshot_of(self, store: EventStore) -> list[tuple[object, ...]]:
        """Everything in the log, for 'changed nothing' assertions."""
        return [
            (e.position, e.stream_id, e.version, e.event_id, e.event_type)
            async for e in store.read_all(raw_unknown=True)
        ]

    # -- appending and expected versions --------------------------------------------------------

    async def test_append_returns_version_and_position(self, store: EventStore) -> None:
        first = await store.append("acc-1", credits(1, 2, 3))
        assert (first.version, first.position) == (3, 3)
        second = await store.append("acc-2", credits(4))
        assert (second.version, second.position) == (1, 4)
        third = await store.append("acc-1", credits(5))
        assert (third.version, third.position) == (4, 5)
        assert await store.head() == 5
        assert await store.stream_version("acc-1") == 4
        assert await store.stream_version("missing") == 0

    async def test_recorded_envelope(self, store: EventStore) -> None:
        before = datetime.now(UTC) - timedelta(seconds=1)
        ids = [uuid.uuid4(), uuid.uuid4()]
        meta = {"correlation_id": "c-1", "causation_id": "x-9", "user_id": "ann"}
        await store.append("acc-1", [Credited(amount=7), Noted(text='zß"\n✓')], metadata=meta, event_ids=ids)
        events = await collect(store.read_stream("acc-1"))
        assert [e.event_id for e in events] == ids
        assert [e.event for e in events] == [Credited(amount=7), Noted(text='zß"\n✓')]
        assert [e.event_type for e in events] == ["tidings.testing.Credited", "tidings.testing.Noted"]
        assert [(e.version, e.position) for e in events] == [(1, 1), (2, 2)]
        for e in events:
            assert e.stream_id == "acc-1"
            # The append adds trace context (a new trace: the metadata names none).
            assert dict(e.metadata) == {**meta, "traceparent": e.metadata["traceparent"]}
            assert e.correlation_id == "c-1" and e.causation_id == "x-9"
            assert e.timestamp.tzinfo is not None
            assert before <= e.timestamp <= datetime.now(UTC) + timedelta(seconds=1)

    async def test_expected_version_int(self, store: EventStore) -> None:
        await store.append("s", credits(1), expected_version=0)
        await store.append("s", credits(2, 3), expected_version=1)
        with pytest.raises(ConcurrencyError) as info:
            await store.append("s", credits(4), expected_version=1)
        assert (info.value.stream_id, info.value.expected, info.value.actual) == ("s", 1, 3)
        assert "'s'" in str(info.value) and "1" in str(info.value) and "3" in str(info.value)
        assert await store.stream_version("s") == 3
        with pytest.raises(ConcurrencyError):
            await store.append("other", credits(1), expected_version=5)
        assert await store.stream_version("other") == 0

    async def test_expected_version_symbols(self, store: EventStore) -> None:
        with pytest.raises(ConcurrencyError) as info:
            await store.append("s", credits(1), expected_version=STREAM_EXISTS)
        assert info.value.actual == 0
        await store.append("s", credits(1), expected_version=NO_STREAM)
        with pytest.raises(ConcurrencyError):
            await store.append("s", credits(2), expected_version=NO_STREAM)
        await store.append("s", credits(2), expected_version=STREAM_EXISTS)
        await store.append("s", credits(3), expected_version=ANY)
        assert await store.stream_version("s") == 3
        assert await store.head() == 3

    async def test_rejected_append_writes_nothing(self, store: EventStore) -> None:
        await store.append("s", credits(1, 2))
        before = await self.snapshot_of(store)
        with pytest.raises(ConcurrencyError):
            await store.append("s", credits(3, 4, 5), expected_version=0)
        assert await self.snapshot_of(store) == before
        # the next append gets the next position: a rejected append consumes none
        result = await store.append("t", credits(9))
        assert result.position == 3

    async def test_empty_append_checks_and_writes_nothing(self, store: EventStore) -> None:
        await store.append("s", credits(1))
        result = await store.append("s", [], expected_version=1)
        assert (result.version, result.position) == (1, 1)
        with pytest.raises(ConcurrencyError):
            await store.append("s", [], expected_version=0)
        assert await store.head() == 1

    async def test_multi_event_append_is_atomic_and_contiguous(self, store: EventStore) -> None:
        results = await asyncio.gather(*(store.append(f"s-{i % 3}", credits(*range(10))) for i in range(12)))
        for stream in ("s-0", "s-1", "s-2"):
            events = await collect(store.read_stream(stream))
            assert [e.version for e in events] == list(range(1, 41))
        all_events = await collect(store.read_all())
        assert [e.position for e in all_events] == list(range(1, 121))
        # each call's ten events are contiguous in the log and in their stream
        for result in results:
            assert result.version % 10 == 0
            chunk = [e for e in all_events if result.position - 10 < e.position <= result.position]
            assert len({e.stream_id for e in chunk}) == 1
            assert [e.event.amount for e in chunk if isinstance(e.event, Credited)] == list(range(10))

    # -- idempotent append ------------------------------------------------------------------------

    async def test_exact_retry_returns_original_result(self, store: EventStore) -> None:
        ids = [uuid.uuid4(), uuid.uuid4()]
        original = await store.append("s", credits(1, 2), expected_version=0, event_ids=ids)
        await store.append("s", credits(3))  # the stream moves on
        retry = await store.append("s", credits(1, 2), expected_version=0, event_ids=ids)
        assert retry == original
        assert await store.stream_version("s") == 3
        assert await store.head() == 3

    async def test_retry_with_any_expected_version(self, store: EventStore) -> None:
        ids = [uuid.uuid4()]
        await store.append("other", credits(0))
        original = await store.append("s", credits(1), event_ids=ids)
        assert await store.append("s", credits(1), event_ids=ids) == original
        assert await store.head() == 2

    async def test_event_id_reuse_is_rejected(self, store: EventStore) -> None:
        a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        await store.append("s", credits(1, 2), event_ids=[a, b])
        before = await self.snapshot_of(store)
        with pytest.raises(DuplicateEventId) as info:
            await store.append("t", credits(1), event_ids=[a])  # another stream
        assert info.value.event_id == a and str(a) in str(info.value)
        with pytest.raises(DuplicateEventId):
            await store.append("s", credits(1, 3), event_ids=[a, c])  # partial overlap
        with pytest.raises(DuplicateEventId):
            await store.append("s", credits(2, 1), event_ids=[b, a])  # other order
        with pytest.raises(DuplicateEventId):
            await store.append("s", credits(2), expected_version=0, event_ids=[b])  # other place
        assert await self.snapshot_of(store) == before
        with pytest.raises(InvalidArgument):
            await store.append("s", credits(1, 2), event_ids=[c, c])
        with pytest.raises(InvalidArgument):
            await store.append("s", credits(1, 2), event_ids=[c])
        assert await self.snapshot_of(store) == before

    async def test_concurrent_retries_store_once(self, store: EventStore) -> None:
        ids = [uuid.uuid4(), uuid.uuid4(), uuid.uuid4()]
        results = await asyncio.gather(
            *(store.append("s", credits(1, 2, 3), event_ids=ids) for _ in range(8))
        )
        assert len(set(results)) == 1
        assert await store.head() == 3

    # -- reading ----------------------------------------------------------------------------------

    async def test_read_stream_after_limit_backwards(self, store: EventStore) -> None:
        await store.append("s", credits(*range(1, 11)))
        await store.append("t", credits(99))

        async def versions(**kwargs: object) -> list[int]:
            return [e.version async for e in store.read_stream("s", **kwargs)]  # type: ignore[arg-type]

        assert await versions() == list(range(1, 11))
        assert await versions(after=7) == [8, 9, 10]
        assert await versions(after=10) == []
        assert await versions(limit=3) == [1, 2, 3]
        assert await versions(after=2, limit=2) == [3, 4]
        assert await versions(limit=0) == []
        assert await versions(backwards=True) == list(range(10, 0, -1))
        assert await versions(backwards=True, limit=2) == [10, 9]
        assert await versions(backwards=True, after=7) == [10, 9, 8]
        assert await versions(backwards=True, before=4) == [3, 2, 1]
        assert await versions(before=4) == [1, 2, 3]
        assert await collect(store.read_stream("missing")) == []

    async def test_read_all_after_limit_and_filters(self, store: EventStore) -> None:
        await store.append("order-1", [Credited(amount=1), Debited(amount=1)])
        await store.append("user-1", [Credited(amount=2)])
        await store.append("order-2", [Debited(amount=3), Noted(text="x")])

        async def positions(**kwargs: object) -> list[int]:
            return [e.position async for e in store.read_all(**kwargs)]  # type: ignore[arg-type]

        assert await positions() == [1, 2, 3, 4, 5]
        assert await positions(after=3) == [4, 5]
        assert await positions(limit=2) == [1, 2]
        assert await positions(event_types=[Debited]) == [2, 4]
        assert await positions(event_types=["tidings.testing.Credited", Noted]) == [1, 3, 5]
        assert await positions(stream_prefix="order-") == [1, 2, 4, 5]
        assert await positions(stream_prefix="order-", event_types=[Debited], after=2) == [4]
        assert await positions(event_types=[]) == []
        assert await positions(stream_prefix="%") == []

    async def test_read_correlated(self, store: EventStore) -> None:
        root = uuid.uuid4()
        await store.append("order-1", [Noted(text="placed")], event_ids=[root])
        await store.append("other", credits(1), metadata={"correlation_id": "unrelated"})
        caused = {"correlation_id": str(root), "causation_id": str(root)}
        await store.append("stock-1", credits(2, 3), metadata=caused)
        await store.append("other", credits(4))
        await store.append("mail-1", [Noted(text="sent")], metadata={"user_id": "u", **caused})
        await store.append("n", credits(5), metadata={"nested": {"correlation_id": str(root)}})
        found = await collect(store.read_correlated([str(root)]))
        assert [(e.stream_id, e.version) for e in found] == [
            ("order-1", 1),
            ("stock-1", 1),
            ("stock-1", 2),
            ("mail-1", 1),
        ]
        assert [e.position for e in found] == sorted(e.position for e in found)
        assert [e.position for e in await collect(store.read_correlated([str(root)], limit=2))] == [
            found[0].position,
            found[1].position,
        ]
        both = await collect(store.read_correlated(["unrelated", str(root), "unrelated"]))
        assert len(both) == 5
        stored = [e async for e in store.read_correlated_stored(["unrelated"])]
        assert [(e.stream_id, e.event_type) for e in stored] == [("other", "tidings.testing.Credited")]
        assert stored[0].metadata is not None and b"unrelated" in stored[0].metadata
        assert await collect(store.read_correlated(["nobody", str(uuid.uuid4())])) == []
        assert await collect(store.read_correlated([])) == []

    async def test_read_correlated_pages_past_one_page(self, store: EventStore) -> None:
        meta = {"correlation_id": "big"}
        for chunk in range(3):
            await store.append(f"s-{chunk}", credits(*range(500)), metadata=meta)
            await store.append("noise", credits(1))
        found = [e.position async for e in store.read_correlated_stored(["big"])]
        assert len(found) == 1500 and found == sorted(set(found))

    async def test_read_correlated_bad_input(self, store: EventStore) -> None:
        await store.append("s", credits(1), metadata={"correlation_id": "c"})
        for bad in ["c", b"c", 42, None, [1], ["a\x00b"], ["\ud800"]]:
            with pytest.raises(InvalidArgument):
                await collect(store.read_correlated(bad))  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await collect(store.read_correlated([f"c-{i}" for i in range(501)]))
        with pytest.raises(InvalidArgument):
            await collect(store.read_correlated(["c"], limit=-1))

    async def test_paging_over_many_events(self, store: EventStore) -> None:
        await store.append("big", credits(*range(2500)))
        await store.append("other", [Debited(amount=1)])
        await store.append("big", credits(*range(10)))
        events = await collect(store.read_all())
        assert [e.position for e in events] == list(range(1, 2512))
        debits = await collect(store.read_all(event_types=[Debited]))
        assert [e.position for e in debits] == [2501]
        backwards = await collect(store.read_stream("big", backwards=True))
        assert [e.version for e in backwards] == list(range(2510, 0, -1))
        limited = await collect(store.read_all(after=100, limit=1500))
        assert [e.position for e in limited] == list(range(101, 1601))

    async def test_streams_listing(self, store: EventStore) -> None:
        await store.append("b", credits(1, 2))
        await store.append("a", credits(1))
        await store.append("b", credits(3))
        streams = [(s.stream_id, s.version, s.position) async for s in store.streams()]
        assert streams == [("a", 1, 3), ("b", 3, 4)]
        assert [s.stream_id async for s in store.streams(prefix="b")] == ["b"]

    async def test_version_at(self, store: EventStore) -> None:
        await store.append("s", credits(1))
        first = (await collect(store.read_stream("s")))[0].timestamp
        await asyncio.sleep(0.01)  # the scenario: time passes between the two appends
        await store.append("s", credits(2))
        assert await store.version_at("s", first) == 1
        assert await store.version_at("s", first - timedelta(seconds=1)) == 0
        assert await store.version_at("s", datetime.now(UTC) + timedelta(seconds=1)) == 2
        with pytest.raises(InvalidArgument):
            await store.version_at("s", datetime(2020, 1, 1))  # naive

    # -- types, upcasting -------------------------------------------------------------------------

    async def test_unknown_types_raise_or_read_raw(self, store: EventStore) -> None:
        await store.append("s", [Credited(amount=5), Noted(text="hi")])
        known = store.registry
        store.registry = EventRegistry()
        store.registry.register(Credited)
        try:
            with pytest.raises(UnknownEventType) as info:
                await collect(store.read_stream("s"))
            assert info.value.event_type == "tidings.testing.Noted"
            raw = await collect(store.read_all(raw_unknown=True))
            assert raw[0].event == Credited(amount=5)
            assert raw[1].event == RawEvent("tidings.testing.Noted", 1, {"text": "hi"})
        finally:
            store.registry = known

    async def test_upcasting_chain(self, store: EventStore) -> None:
        old = EventRegistry()

        class RenamedV1(Event):
            __event_type__ = "tidings.testing.Renamed"
            __event_register__ = False
            name: str

        old.register(RenamedV1)
        known = store.registry
        store.registry = old
        try:
            await store.append("s", [RenamedV1(name="ada")])
        finally:
            store.registry = known

        new = EventRegistry()

        class RenamedV3(Event):
            __event_type__ = "tidings.testing.Renamed"
            __event_version__ = 3
            __event_register__ = False
            first_name: str
            title: str

        new.register(RenamedV3)
        store.registry = new
        try:
            with pytest.raises(UpcastError):
                await collect(store.read_stream("s"))
            new.add_upcaster("tidings.testing.Renamed", 1, lambda d: {"first_name": d["name"]})
            with pytest.raises(UpcastError) as info:
                await collect(store.read_stream("s"))
            assert "version 2" in str(info.value)
            new.add_upcaster("tidings.testing.Renamed", 2, lambda d: {**d, "title": "Dr"})
            [recorded] = await collect(store.read_stream("s"))
            assert recorded.event == RenamedV3(first_name="ada", title="Dr")
            assert recorded.schema_version == 1
        finally:
            store.registry = known

    # -- concurrency ------------------------------------------------------------------------------

    async def test_twenty_writers_one_stream_one_winner_per_version(self, store: EventStore) -> None:
        await store.append("hot", credits(0))
        wins: list[int] = []

        async def writer(n: int) -> None:
            for _ in range(5):
                while True:
                    version = await store.stream_version("hot")
                    try:
                        result = await store.append("hot", credits(n), expected_version=version)
                    except ConcurrencyError:
                        continue
                    wins.append(result.version)
                    break

        await asyncio.gather(*(writer(n) for n in range(20)))
        assert sorted(wins) == list(range(2, 102))
        events = await collect(store.read_stream("hot"))
        assert [e.version for e in events] == list(range(1, 102))
        assert [e.position for e in await collect(store.read_all())] == list(range(1, 102))

    async def test_twenty_racers_for_one_version(self, store: EventStore) -> None:
        outcomes = await asyncio.gather(
            *(store.append("race", credits(i), expected_version=NO_STREAM) for i in range(20)),
            return_exceptions=True,
        )
        winners = [o for o in outcomes if not isinstance(o, BaseException)]
        losers = [o for o in outcomes if isinstance(o, ConcurrencyError)]
        assert len(winners) == 1 and len(losers) == 19
        assert await store.head() == 1

    # -- bad input ---------------------------------------------------------------------------------

    async def test_bad_stream_ids(self, store: EventStore) -> None:
        await store.append("ok", credits(1))
        for bad in ["", "x" * 10_000_000, "a\x00b", 42, None]:
            with pytest.raises(InvalidStreamId):
                await store.append(bad, credits(1))  # type: ignore[arg-type]
        with pytest.raises(InvalidStreamId):
            await collect(store.read_stream(""))
        assert await store.head() == 1

    async def test_bad_arguments(self, store: EventStore) -> None:
        await store.append("ok", credits(1))
        with pytest.raises(InvalidArgument):
            await collect(store.read_all(after=-1))
        with pytest.raises(InvalidArgument):
            await collect(store.read_stream("ok", after=-1))
        with pytest.raises(InvalidArgument):
            await collect(store.read_all(limit=-5))
        with pytest.raises(InvalidArgument):
            await collect(store.read_all(event_types=[42]))  # type: ignore[list-item]
        with pytest.raises(InvalidArgument):
            await store.append("ok", credits(1), expected_version=-1)
        with pytest.raises(InvalidArgument):
            await store.append("ok", credits(1), expected_version="1")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument):
            await store.append("ok", Credited(amount=1))  # type: ignore[arg-type]
        assert await store.head() == 1

    async def test_unserialisable_event_writes_nothing(self, store: EventStore) -> None:
        await store.append("ok", credits(1))
        with pytest.raises(SerializationError):
            await store.append("ok", [Credited(amount=2), Opaque(payload=object())])
        with pytest.raises(SerializationError):
            await store.append("ok", ["not an event"])  # type: ignore[list-item]
        with pytest.raises(SerializationError):
            await store.append("ok", credits(2), metadata={"when": object()})
        assert [e.version async for e in store.read_stream("ok")] == [1]
        assert await store.head() == 1

    # -- snapshots and lifecycle ---------------------------------------------------------------------

    async def test_snapshots(self, store: EventStore) -> None:
        assert await store.load_snapshot("s") is None
        for version in (5, 10):
            await store.save_snapshot(Snapshot("s", version, "Acc", "h1", b'{"v":%d}' % version))
        latest = await store.load_snapshot("s")
        assert latest is not None and (latest.version, latest.state) == (10, b'{"v":10}')
        older = await store.load_snapshot("s", max_version=9)
        assert older is not None and older.version == 5
        assert await store.load_snapshot("s", max_version=4) is None
        await store.save_snapshot(Snapshot("s", 10, "Acc", "h2", b"{}"))
        replaced = await store.load_snapshot("s")
        assert replaced is not None and replaced.schema == "h2"

    async def test_closed_store_refuses(self, store: EventStore) -> None:
        await store.append("s", credits(1))
        await store.close()
        with pytest.raises(StoreClosed):
            await store.append("s", credits(2))
        with pytest.raises(StoreClosed):
            await collect(store.read_all())

    async def test_wait_for_append_wakes_on_append(self, store: EventStore) -> None:
        waiter = asyncio.create_task(store.wait_for_append(0, timeout=10))
        await asyncio.sleep(0.01)  # a chance to block first; the assertions hold either way
        assert not waiter.done()
        await store.append("s", credits(1))
        assert await asyncio.wait_for(waiter, 5) == 1
        assert await store.wait_for_append(0, timeout=0.01) == 1
        assert await store.wait_for_append(1, timeout=0.01) == 1
