"""Bad input, as a new user (or an attacker) would pass it, on every backend.

Every public call of :class:`EventStore`, :class:`Repository` and :class:`Aggregate` given a value
of the wrong type or one that cannot be stored raises a :class:`TidingsError` subclass naming what
was wrong -- never a raw ``TypeError``, ``OverflowError`` or ``UnicodeEncodeError`` -- and changes
nothing. A stored event that can no longer be read raises :class:`CorruptEvent` naming the stream,
version, position and type, whichever API reads it.
"""

from __future__ import annotations

import math
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests import servers
from tidings import (
    Aggregate,
    CorruptEvent,
    Event,
    EventRegistry,
    EventStore,
    EventTypeError,
    InvalidArgument,
    InvalidStreamId,
    Repository,
    SerializationError,
    Snapshot,
    SQLStore,
    TidingsError,
    TrackingStore,
    UnknownEventType,
    UpcastError,
    open_store,
    upcaster,
)
from tidings.store.memory import MemoryStore
from tidings.store.postgres import PostgresStore
from tidings.store.sqlite import SQLiteStore
from tidings.testing import Credited, Opaque, collect

BACKENDS = ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


class Priced(Event):
    __event_type__ = "tests.bad_input.Priced"
    price: float


class Nested(Event):
    __event_type__ = "tests.bad_input.Nested"
    prices: dict[str, list[float]]


class Wallet(Aggregate):
    balance: int = 0

    def credit(self, amount: int) -> None:
        self.record(Credited(amount=amount))

    def apply(self, event: Event) -> None:
        match event:
            case Credited(amount=a):
                self.balance += a


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/bad.db"
    else:
        url = request.getfixturevalue("pg_url")
    async with open_store(url) as store:
        yield store


async def state(store: EventStore) -> tuple[int, list[tuple[str, int]]]:
    """What a bad call must leave unchanged: the head and every stream's version."""
    return await store.head(), [(s.stream_id, s.version) async for s in store.streams()]


async def overwrite_row(store: EventStore, position: int, **columns: Any) -> None:
    """Change a stored event's columns behind the store's back, as a hand edit or an old writer
    would (``data``, ``metadata``, ``event_type``, ``schema_version``)."""
    names = ["position", "stream_id", "version", "event_id", "event_type", "schema_version"]
    names += ["timestamp", "data", "metadata"]
    if isinstance(store, MemoryStore):
        old = store._log[position - 1]
        new = tuple(columns.get(name, value) for name, value in zip(names, old, strict=True))
        store._log[position - 1] = new
        stream = store._streams[old[1]]
        stream[stream.index(old)] = new
    elif isinstance(store, SQLiteStore):
        sets = ", ".join(f"{name} = ?" for name in columns)
        with sqlite3.connect(store.config.path) as conn:
            conn.execute(
                f"UPDATE tidings_events SET {sets} WHERE position = ?", [*columns.values(), position]
            )
    else:
        assert isinstance(store, PostgresStore)
        sets = ", ".join(f"{name} = %s" for name in columns)
        with psycopg.connect(servers.libpq_url(store.url), autocommit=True) as pg:
            pg.execute(
                f'UPDATE "{store.config.schema}".tidings_events SET {sets} WHERE position = %s',
                [*columns.values(), position],
            )


# -- values JSON cannot hold -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_non_finite_float_is_refused_and_nothing_is_written(store: EventStore, value: float) -> None:
    await store.append("p", [Priced(price=1.5)])
    before = await state(store)
    with pytest.raises(SerializationError) as info:
        await store.append("p", [Priced(price=2.0), Priced(price=value)])
    assert "price" in str(info.value) and "tests.bad_input.Priced" in str(info.value)
    with pytest.raises(SerializationError) as info:
        await store.append("q", [Nested(prices={"eur": [1.0, value]})])
    assert "prices.eur[1]" in str(info.value)
    with pytest.raises(SerializationError) as info:
        await store.append("q", [Opaque(payload={"a": [value]})])
    assert "payload.a[0]" in str(info.value)
    with pytest.raises(SerializationError) as info:
        await store.append("q", [Priced(price=1.0)], metadata={"score": value})
    assert "metadata.score" in str(info.value)
    assert await state(store) == before
    # The stream is still readable, and finite floats and strings that merely spell NaN are fine.
    await store.append("p", [Priced(price=-0.0), Opaque(payload="NaN Infinity")])
    [first, _, second] = await collect(store.read_stream("p"))
    assert first.event == Priced(price=1.5) and second.event == Opaque(payload="NaN Infinity")


async def test_text_that_cannot_be_encoded_is_refused(store: EventStore) -> None:
    await store.append("s", [Credited(amount=1)])
    before = await state(store)
    with pytest.raises(SerializationError):
        await store.append("s", [Opaque(payload="lone \ud800 surrogate")])
    with pytest.raises(SerializationError):
        await store.append("s", [Credited(amount=1)], metadata={"user": "\udcff"})
    with pytest.raises(SerializationError):
        await store.append("s", [Credited(amount=1)], metadata={"\ud800": 1})
    with pytest.raises(InvalidArgument, match="stream_prefix"):
        await collect(store.read_all(stream_prefix="s\ud800"))
    with pytest.raises(InvalidArgument, match="event type"):
        await collect(store.read_all(event_types=["\ud800"]))
    with pytest.raises(InvalidArgument, match="prefix"):
        await collect(store.streams(prefix="\udfff"))
    with pytest.raises(InvalidArgument, match="subscription group"):
        await store.load_checkpoint("group-\ud800")
    with pytest.raises(InvalidArgument, match="subscription group"):
        await store.set_checkpoint("group-\ud800", 1)
    with pytest.raises(InvalidArgument, match="aggregate_type"):
        await store.save_snapshot(Snapshot("s", 1, "W\ud800", "h", b"{}"))
    assert await state(store) == before
    assert await store.checkpoints() == {}
    assert await store.load_snapshot("s") is None


async def test_unicode_edge_cases_round_trip(store: EventStore) -> None:
    texts = ["", "\x01\x7f", "e\u0301", "\U0001f600" * 100, "\u202eevil", "\ufeff", "a\u2028b", "\uffff"]
    for i, text in enumerate(texts):
        await store.append(f"u-{text}-{i}", [Opaque(payload={text: text})], metadata={"k": text})
    events = await collect(store.read_all())
    assert [e.event for e in events] == [Opaque(payload={t: t}) for t in texts]
    assert [e.metadata["k"] for e in events] == texts
    assert [e.stream_id async for e in store.read_all(stream_prefix="u-\U0001f600")] == [events[3].stream_id]


async def test_large_and_deep_payloads(store: EventStore) -> None:
    big = "x" * 5_000_000
    await store.append("big", [Opaque(payload=big)])
    [recorded] = await collect(store.read_stream("big"))
    assert recorded.event == Opaque(payload=big)
    deep: Any = 1
    for _ in range(200):
        deep = [deep]
    await store.append("deep", [Opaque(payload=deep)])
    [recorded] = await collect(store.read_stream("deep"))
    assert recorded.event == Opaque(payload=deep)
    # Too deep for JSON encoding: refused with a typed error, not a RecursionError.
    for _ in range(2000):
        deep = [deep]
    before = await state(store)
    with pytest.raises(SerializationError):
        await store.append("deep", [Opaque(payload=deep)])
    assert await state(store) == before


# -- stored events that no longer read ---------------------------------------------------------------


def envelope_readers(store: EventStore) -> list[Callable[[], Any]]:
    """The readers that return the envelope (and so decode metadata too)."""
    return [
        lambda: collect(store.read_stream("w")),
        lambda: collect(store.read_stream("w", backwards=True)),
        lambda: collect(store.read_all()),
    ]


def event_readers(store: EventStore) -> list[Callable[[], Any]]:
    """The readers that decode only the events: the aggregate replay path."""
    return [lambda: Repository(store, Wallet).get("w"), lambda: collect(store.stream_events("w"))]


@pytest.mark.parametrize(
    "columns",
    [
        {"data": b'{"amount": "lots"}'},  # written by an older class, or edited by hand
        {"data": b"\xff{not json"},
        {"data": b"[1, 2]"},
        {"metadata": b"{broken"},
        {"metadata": b"[]"},
    ],
    ids=["invalid", "not-json", "not-object", "metadata-not-json", "metadata-not-object"],
)
async def test_corrupt_stored_event_is_named_by_every_reader(
    store: EventStore, columns: dict[str, bytes]
) -> None:
    await store.append("other", [Credited(amount=7)])
    wallet = Wallet("w")
    for amount in (1, 2, 3):
        wallet.credit(amount)
    await Repository(store, Wallet).save(wallet, metadata={"user": "u"})
    await overwrite_row(store, 3, **columns)  # stream "w", version 2
    readers = envelope_readers(store)
    if "data" in columns:
        readers += event_readers(store)
    else:
        assert (await Repository(store, Wallet).get("w")).balance == 6  # replay needs no metadata
    for read in readers:
        with pytest.raises(CorruptEvent) as info:
            await read()
        error = info.value
        assert (error.stream_id, error.version, error.position) == ("w", 2, 3)
        assert error.event_type == "tidings.testing.Credited" and error.schema_version == 1
        assert "'w'" in str(error) and "version 2" in str(error) and "position 3" in str(error)
        assert "tidings.testing.Credited" in str(error)
        assert error.permanent
    # The rest of the store reads, and reading the good part of the stream still works.
    assert [e.version async for e in store.read_stream("w", limit=1)] == [1]
    assert await Repository(store, Wallet).get("other") is not None


async def test_event_from_newer_code_names_where_it_is(store: EventStore) -> None:
    wallet = Wallet("w")
    wallet.credit(1)
    wallet.credit(2)
    await Repository(store, Wallet).save(wallet)
    await overwrite_row(store, 2, schema_version=5)
    for read in envelope_readers(store) + event_readers(store):
        with pytest.raises(UpcastError) as info:
            await read()
        assert "stream 'w', version 2, position 2" in str(info.value)
        assert (info.value.from_version, info.value.to_version) == (5, 1)


async def test_unknown_type_with_corrupt_data_read_raw(store: EventStore) -> None:
    await store.append("w", [Credited(amount=1)])
    await overwrite_row(store, 1, event_type="tests.bad_input.Gone", data=b"{oops")
    with pytest.raises(UnknownEventType):
        await collect(store.read_all())
    with pytest.raises(CorruptEvent, match=r"tests\.bad_input\.Gone"):
        await collect(store.read_all(raw_unknown=True))
    with pytest.raises(UnknownEventType):
        await Repository(store, Wallet).get("w")


# -- wrong types and out-of-range values in every public call ------------------------------------------


BIG = [2**63, 2**64, 2**70]


@pytest.mark.parametrize("big", BIG)
async def test_numbers_beyond_64_bits(store: EventStore, big: int) -> None:
    await store.append("s", [Credited(amount=1)])
    before = await state(store)
    calls = [
        lambda: collect(store.read_all(after=big)),
        lambda: collect(store.read_stream("s", after=big)),
        lambda: collect(store.read_stream("s", before=big)),
        lambda: collect(store.read_stream("s", limit=big)),
        lambda: collect(store.stream_events("s", after=big)),
        lambda: store.append("s", [Credited(amount=1)], expected_version=big),
        lambda: store.load_snapshot("s", max_version=big),
        lambda: store.save_snapshot(Snapshot("s", big, "Wallet", "h", b"{}")),
        lambda: store.set_checkpoint("g", big),
        lambda: store.wait_for_append(big, timeout=0),
        lambda: Repository(store, Wallet).get("s", at_version=big),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument, match="2\\*\\*63"):
            await call()
    assert await state(store) == before
    assert await store.checkpoints() == {}
    # An int64 itself is accepted.
    assert await collect(store.read_all(after=2**63 - 1)) == []
    assert await store.load_snapshot("s", max_version=2**63 - 1) is None


NOT_EVENT_LISTS: list[Any] = [None, 5, 1.5, "abc", b"abc", {"amount": 1}, Credited(amount=1), object()]


@pytest.mark.parametrize("events", NOT_EVENT_LISTS, ids=lambda v: type(v).__name__)
async def test_append_given_no_list_of_events(store: EventStore, events: Any) -> None:
    before = await state(store)
    with pytest.raises(InvalidArgument, match="append takes a list of events") as info:
        await store.append("s", events)
    assert type(events).__qualname__ in str(info.value)
    assert await state(store) == before


@pytest.mark.parametrize("item", [None, 1, "event", {"amount": 1}, Credited, Wallet("w")])
async def test_append_given_a_list_with_a_non_event(store: EventStore, item: Any) -> None:
    before = await state(store)
    with pytest.raises(SerializationError, match=r"events\[1\] is not a tidings.Event"):
        await store.append("s", [Credited(amount=1), item])
    with pytest.raises(SerializationError, match=r"events\[0\]"):
        await store.append("s", (e for e in [item]))
    assert await state(store) == before


@pytest.mark.parametrize("metadata", [[("a", 1)], "user=1", 5, b"{}", ["x"], 0, ""])
async def test_metadata_that_is_not_a_mapping(store: EventStore, metadata: Any) -> None:
    before = await state(store)
    with pytest.raises(InvalidArgument, match="metadata must be a mapping"):
        await store.append("s", [Credited(amount=1)], metadata=metadata)
    assert await state(store) == before


async def test_metadata_values_json_cannot_hold(store: EventStore) -> None:
    before = await state(store)
    for metadata in [{1: "int key"}, {"when": object()}, {"set": {1, 2}}, {"nan": [math.nan]}]:
        with pytest.raises(SerializationError):
            await store.append("s", [Credited(amount=1)], metadata=metadata)
    assert await state(store) == before
    # Empty metadata and the documented conveniences (UUIDs, datetimes) are stored.
    when = datetime(2030, 1, 1, tzinfo=UTC)
    ident = uuid.uuid4()
    await store.append("s", [Credited(amount=1)], metadata={})
    await store.append("s", [Credited(amount=1)], metadata={"id": ident, "at": when, "none": None})
    [plain, rich] = await collect(store.read_stream("s"))
    # Every event gets trace context (tidings.tracing), whatever metadata it was given.
    assert set(plain.metadata) == {"traceparent"}
    assert {k: v for k, v in rich.metadata.items() if k != "traceparent"} == {
        "id": str(ident),
        "at": when.isoformat(),
        "none": None,
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"expected_version": -1},
        {"expected_version": "1"},
        {"expected_version": 1.0},
        {"expected_version": True},
        {"expected_version": None},
        {"event_ids": 5},
        {"event_ids": "abc"},
        {"event_ids": [str(uuid.uuid4())]},
        {"event_ids": []},
    ],
    ids=repr,
)
async def test_append_options_of_the_wrong_type(store: EventStore, kwargs: dict[str, Any]) -> None:
    before = await state(store)
    with pytest.raises(InvalidArgument):
        await store.append("s", [Credited(amount=1)], **kwargs)
    assert await state(store) == before


WRONG_STREAM_IDS: list[Any] = [None, 1, b"s", ["s"], "", "a\x00b", "x" * 513]


@pytest.mark.parametrize("stream_id", WRONG_STREAM_IDS, ids=repr)
async def test_stream_id_of_the_wrong_type(store: EventStore, stream_id: Any) -> None:
    calls = [
        lambda: store.append(stream_id, [Credited(amount=1)]),
        lambda: collect(store.read_stream(stream_id)),
        lambda: collect(store.stream_events(stream_id)),
        lambda: store.stream_version(stream_id),
        lambda: store.version_at(stream_id, datetime.now(UTC)),
        lambda: store.load_snapshot(stream_id),
        lambda: Repository(store, Wallet).get(stream_id),
    ]
    for call in calls:
        with pytest.raises(InvalidStreamId):
            await call()
    assert await state(store) == (0, [])


@pytest.mark.parametrize("value", [None, "1", 1.5, -1, True, [1]], ids=repr)
async def test_positions_of_the_wrong_type(store: EventStore, value: Any) -> None:
    await store.append("s", [Credited(amount=1)])
    nullable = value is None
    calls = [
        lambda: collect(store.read_all(after=value)),
        lambda: collect(store.read_stream("s", after=value)),
        lambda: collect(store.stream_events("s", after=value)),
        lambda: store.wait_for_append(value, timeout=0),
    ]
    if not nullable:
        calls += [
            lambda: collect(store.read_all(limit=value)),
            lambda: collect(store.read_stream("s", before=value)),
            lambda: store.load_snapshot("s", max_version=value),
            lambda: store.set_checkpoint("g", value),
            lambda: Repository(store, Wallet).get("s", at_version=value),
        ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            await call()
    assert await store.checkpoints() == {}


async def test_other_arguments_of_the_wrong_type(store: EventStore) -> None:
    await store.append("s", [Credited(amount=1)])
    before = await state(store)
    calls: list[Callable[[], Any]] = [
        lambda: collect(store.read_all(event_types=5)),
        lambda: collect(store.read_all(event_types=[5])),
        lambda: collect(store.read_all(event_types=[Wallet])),
        lambda: collect(store.read_all(stream_prefix=5)),
        lambda: collect(store.streams(prefix=b"s")),
        lambda: store.version_at("s", "2020-01-01"),
        lambda: store.version_at("s", 0),
        lambda: store.version_at("s", datetime(2020, 1, 1)),
        lambda: store.wait_for_append(0, timeout="1"),
        lambda: store.wait_for_append(0, timeout=-1),
        lambda: store.wait_for_append(0, timeout=math.nan),
        lambda: store.save_snapshot("snapshot"),
        lambda: store.save_snapshot(Snapshot("s", 1, "W", "h", "state")),
        lambda: store.save_snapshot(Snapshot("s", 1, 5, "h", b"{}")),
        lambda: store.load_checkpoint(5),
        lambda: store.load_checkpoint(""),
        lambda: store.set_checkpoint(None, 1),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            await call()
    assert await state(store) == before
    assert await store.load_snapshot("s") is None
    # A single Event class (not in a list) is a valid filter.
    assert len(await collect(store.read_all(event_types=Credited))) == 1


async def test_processing_calls_with_wrong_types(store: EventStore) -> None:
    await store.append("s", [Credited(amount=1)])
    before = await state(store)

    async def not_sync(tx: Any) -> None:
        return None

    assert isinstance(store, TrackingStore)
    sql: list[Callable[[], Any]] = []
    if isinstance(store, SQLStore):
        sql = [
            lambda: store.query(5),
            lambda: store.query(b"SELECT 1"),
            lambda: store.query("SELECT '\ud800'"),
            lambda: store.query("SELECT ?", 5),
            lambda: store.query("SELECT ?", "a"),
            lambda: store.transaction(5),
            lambda: store.transaction(not_sync),
        ]
    calls: list[Callable[[], Any]] = [
        *sql,
        lambda: store.dead_letter("1"),
        lambda: store.dead_letter(2**70),
        lambda: store.discard_dead_letter(2**70),
        lambda: store.discard_dead_letter(None),
        lambda: store.processed_ids("g", ["not-a-uuid"]),
        lambda: store.processed_ids("g", None),
        lambda: store.processed_ids("g", str(uuid.uuid4())),
        lambda: store.wait_for(1, group="g", timeout="soon"),
        lambda: store.wait_for("1", group="g", timeout=0),
        lambda: store.dead_letters(5),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument):
            await call()
    with pytest.raises(InvalidArgument):
        store.group_lock(5)  # type: ignore[arg-type]
    assert await state(store) == before
    assert await store.processed_ids("g", []) == set()


@pytest.mark.parametrize("name", ["", "bad-\ud800", "nul\x00", 5, "x" * 201])
def test_event_type_names_that_cannot_be_stored(name: Any) -> None:
    with pytest.raises(EventTypeError):
        type("Weird", (Event,), {"__event_type__": name, "__annotations__": {"a": int}})


async def test_upcaster_registration_with_wrong_types() -> None:
    registry = EventRegistry()
    for args in [("T", "1"), ("T", 0), ("T", True), (5, 1), ("", 1)]:
        with pytest.raises(EventTypeError):
            upcaster(args[0], args[1], registry=registry)(lambda data: data)  # type: ignore[arg-type]
    with pytest.raises(EventTypeError):
        registry.add_upcaster("T", 1, "not callable")  # type: ignore[arg-type]


async def test_repository_and_aggregate_wrong_types(store: EventStore) -> None:
    repository = Repository(store, Wallet)
    for args in [(None, Wallet), ("memory://", Wallet), (store, Credited), (store, Wallet("w")), (store, 5)]:
        with pytest.raises(InvalidArgument):
            Repository(*args)
    for every in [0, -1, True, "5", 1.5]:
        with pytest.raises(InvalidArgument):
            Repository(store, Wallet, snapshot_every=every)
    with pytest.raises(InvalidArgument):
        await repository.get("w", at_time="yesterday")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        await repository.get("w", at_time=datetime(2020, 1, 1))
    with pytest.raises(InvalidArgument):
        await repository.save("not an aggregate")  # type: ignore[arg-type]

    class Other(Aggregate):
        pass

    with pytest.raises(InvalidArgument):
        await repository.save(Other("o"))  # type: ignore[arg-type]
    wallet = Wallet("w")
    wallet.credit(5)
    with pytest.raises(InvalidArgument):
        await repository.save(wallet, metadata=["not", "a", "mapping"])  # type: ignore[arg-type]
    assert wallet.pending_events == [Credited(amount=5)]  # kept for a retry
    for bad_id in [None, 5, ""]:
        with pytest.raises(InvalidArgument):
            Wallet(bad_id)
    for bad_event in [None, {"amount": 1}, Credited]:
        with pytest.raises(InvalidArgument):
            wallet.record(bad_event)
    for bad_events in [None, 5, Credited(amount=1), "events"]:
        with pytest.raises(InvalidArgument):
            Wallet("x").replay(bad_events)
    with pytest.raises(InvalidArgument):
        Wallet("x").replay([Credited(amount=1), "not an event"])
    assert await state(store) == (0, [])
    # And the right types still work after all that.
    await repository.save(wallet)
    assert (await repository.get("w")).balance == 5


async def test_every_error_above_is_a_tidings_error() -> None:
    """The errors the tests above expect are all in the library's family (no ValueError leaks)."""
    for cls in (InvalidArgument, InvalidStreamId, SerializationError, CorruptEvent, UnknownEventType):
        assert issubclass(cls, TidingsError)
    assert CorruptEvent.permanent and issubclass(CorruptEvent, SerializationError)
