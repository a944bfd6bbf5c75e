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
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from tests import servers

from tidings import (
    Aggregate,
    CorruptEvent,
    Event,
    EventStore,
    Repository,
    SerializationError,
    UnknownEventType,
    open_store,
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


async def test_unknown_type_with_corrupt_data_read_raw(store: EventStore) -> None:
    await store.append("w", [Credited(amount=1)])
    await overwrite_row(store, 1, event_type="tests.bad_input.Gone", data=b"{oops")
    with pytest.raises(UnknownEventType):
        await collect(store.read_all())
    with pytest.raises(CorruptEvent, match=r"tests\.bad_input\.Gone"):
        await collect(store.read_all(raw_unknown=True))
    with pytest.raises(UnknownEventType):
        await Repository(store, Wallet).get("w")
