"""sqlite3's errors, raised by a real SQLite file, come out as tidings' own and say whether to retry."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path

import pytest

from tidings import (
    AppendResult,
    IntegrityError,
    StatementError,
    StoreUnavailable,
    open_store,
)
from tidings.errors import InvalidArgument, is_transient
from tidings.store.append import AppendRequest, EncodedEvent
from tidings.store.sqlite import SQLiteStore
from tidings.store.sqlite.writer import append_in
from tidings.testing import Credited


async def open_sqlite(path: Path, **options: str) -> SQLiteStore:
    query = "&".join(f"{k}={v}" for k, v in options.items())
    store = open_store(f"sqlite:///{path}" + (f"?{query}" if query else ""))
    assert isinstance(store, SQLiteStore)
    return await store.open()


async def test_statement_errors_are_permanent(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "s.db")
    try:
        for sql in ("SELECT * FROM no_such_table", "SELEC 1", "SELECT no_such_column FROM tidings_events"):
            with pytest.raises(StatementError) as info:
                await store.query(sql)
            assert info.value.permanent and isinstance(info.value.__cause__, sqlite3.Error)
        # The same through the Tx handed to projections and handlers, binding errors included.
        with pytest.raises(StatementError) as info:
            await store.transaction(lambda tx: tx.execute("INSERT INTO nowhere VALUES (1)"))
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(StatementError) as info:
            await store.transaction(lambda tx: tx.fetchone("SELECT ?", (2**70,)))
        assert isinstance(info.value.__cause__, OverflowError)
        with pytest.raises(StatementError):
            await store.transaction(lambda tx: tx.fetchall("SELECT ?", (object(),)))
        # Nothing leaked raw, and the store still works.
        assert (await store.append("s", [Credited(amount=1)])).position == 1
    finally:
        await store.close()


async def test_a_unique_violation_is_an_integrity_error(tmp_path: Path) -> None:
    store = await open_sqlite(tmp_path / "u.db")
    try:
        await store.transaction(lambda tx: tx.execute("CREATE TABLE seen (id TEXT PRIMARY KEY)"))
        await store.transaction(lambda tx: tx.execute("INSERT INTO seen VALUES ('a')"))
        with pytest.raises(IntegrityError) as info:
            await store.transaction(lambda tx: tx.execute("INSERT INTO seen VALUES ('a')"))
        assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
        assert not info.value.permanent and not info.value.transient
        assert await store.query("SELECT count(*) FROM seen") == [(1,)]
    finally:
        await store.close()


async def test_a_locked_database_is_transient(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    store = await open_sqlite(path, busy_timeout="100")
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        with pytest.raises(StoreUnavailable) as info:
            await store.append("s", [Credited(amount=1)])
        assert is_transient(info.value) and "locked" in str(info.value)
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        with pytest.raises(StoreUnavailable):
            await store.transaction(lambda tx: tx.execute("CREATE TABLE t (x INT)"))
        holder.execute("ROLLBACK")
        # Waiting it out works: the same append now succeeds.
        assert (await store.append("s", [Credited(amount=1)])).position == 1
    finally:
        holder.close()
        await store.close()


async def test_a_request_the_writer_cannot_store_fails_alone(tmp_path: Path) -> None:
    """Even a request that got past validation fails only itself in a merged group commit."""
    store = await open_sqlite(tmp_path / "w.db")
    try:
        event = EncodedEvent(uuid.uuid4(), "t", 1, b"{}")
        bad = AppendRequest("a\ud800", (event,), 0, None, False)  # bypasses validate_stream_id
        outcomes = await asyncio.gather(
            store.append("x", [Credited(amount=1)]),
            store.write(lambda conn: append_in(conn, bad), _request=bad),
            store.append("y", [Credited(amount=2)]),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], AppendResult) and isinstance(outcomes[2], AppendResult)
        # The value was the caller's to fix: a permanent InvalidArgument naming the stream.
        assert isinstance(outcomes[1], InvalidArgument) and outcomes[1].permanent
        assert isinstance(outcomes[1].__cause__, UnicodeEncodeError)
        assert [e.stream_id async for e in store.read_all()] == ["x", "y"]
    finally:
        await store.close()
