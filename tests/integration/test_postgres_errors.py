"""psycopg's errors, raised by the real test server, come out as tidings' own and say whether to retry."""

from __future__ import annotations

import asyncio
import uuid

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from tests import servers
from tests.helpers import wait_until
from tidings import (
    AppendResult,
    IntegrityError,
    StatementError,
    StoreUnavailable,
    Tx,
    open_store,
)
from tidings.errors import is_permanent, is_transient
from tidings.store.append import AppendRequest, EncodedEvent
from tidings.store.postgres import PostgresStore
from tidings.testing import Credited

pytestmark = pytest.mark.postgres


async def test_statement_errors_are_permanent(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        for sql in ("SELECT * FROM no_such_table", "SELEC 1", "SELECT 1 / 0", "SELECT 'x'::int"):
            with pytest.raises(StatementError) as info:
                await store.query(sql)
            assert is_permanent(info.value) and isinstance(info.value.__cause__, psycopg.Error)
        # The same through the Tx handed to projections and handlers.
        with pytest.raises(StatementError) as info:
            await store.transaction(lambda tx: tx.execute("INSERT INTO nowhere VALUES (1)"))
        assert isinstance(info.value.__cause__, psycopg.errors.UndefinedTable)
        assert "42P01" in str(info.value)
        assert (await store.append("s", [Credited(amount=1)])).position == 1


async def test_a_unique_violation_is_an_integrity_error(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        await store.transaction(lambda tx: tx.execute("CREATE TABLE seen (id text PRIMARY KEY)"))
        await store.transaction(lambda tx: tx.execute("INSERT INTO seen VALUES ('a')"))
        with pytest.raises(IntegrityError) as info:
            await store.transaction(lambda tx: tx.execute("INSERT INTO seen VALUES ('a')"))
        assert isinstance(info.value.__cause__, psycopg.errors.UniqueViolation)
        assert not info.value.permanent and not info.value.transient
        assert await store.query("SELECT count(*) FROM seen") == [(1,)]


async def test_a_statement_timeout_is_transient(pg_url: str) -> None:
    async with open_store(pg_url) as store:

        def slow(tx: Tx) -> None:
            tx.execute("SET LOCAL statement_timeout = 50")
            tx.execute("SELECT pg_sleep(5)")

        with pytest.raises(StoreUnavailable) as info:
            await store.transaction(slow)
        assert is_transient(info.value) and "57014" in str(info.value)


async def test_a_terminated_connection_is_transient(pg_url: str) -> None:
    """``pg_terminate_backend`` of the store's connection in the middle of a query."""
    async with open_store(pg_url) as store:
        marker = f"tidings-{uuid.uuid4().hex}"
        task = asyncio.create_task(
            store.transaction(lambda tx: tx.execute(f"SELECT pg_sleep(30) /* {marker} */"))
        )
        async with await psycopg.AsyncConnection.connect(servers.libpq_url(pg_url), autocommit=True) as admin:

            async def terminated() -> bool:
                cur = await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE query LIKE %s AND pid <> pg_backend_pid()",
                    (f"%{marker}%",),
                )
                return bool(await cur.fetchall())

            # The fault happened: the store's connection was terminated in the middle of its query.
            await wait_until(terminated, 10, "the store's query to be running (to terminate it)")
        with pytest.raises(StoreUnavailable) as info:
            await asyncio.wait_for(task, 20)
        assert is_transient(info.value) and isinstance(info.value.__cause__, psycopg.OperationalError)
        # The store carries on with fresh connections.
        assert (await store.append("s", [Credited(amount=1)])).position == 1


async def test_a_pool_timeout_is_transient(pg_url: str) -> None:
    async with open_store(servers.with_options(pg_url, pool_size="1", pool_timeout="0.2")) as store:
        holding = asyncio.Event()
        release = asyncio.Event()
        loop = asyncio.get_running_loop()

        def hold(tx: Tx) -> None:
            loop.call_soon_threadsafe(holding.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()

        task = asyncio.create_task(store.transaction(hold))
        await holding.wait()
        with pytest.raises(StoreUnavailable) as info:
            await store.query("SELECT 1")
        assert isinstance(info.value.__cause__, PoolTimeout)
        release.set()
        await task


async def test_a_request_the_writer_cannot_store_fails_alone(pg_url: str) -> None:
    """Even a request that got past validation fails only itself in a group commit."""
    async with open_store(pg_url) as store:
        assert isinstance(store, PostgresStore)
        event = EncodedEvent(uuid.uuid4(), "t", 1, b"{}")
        bad = AppendRequest("a\ud800", (event,), 0, None, False)  # bypasses validate_stream_id
        outcomes = await asyncio.gather(
            store.append("x", [Credited(amount=1)]),
            store._writer.submit(bad),
            store.append("y", [Credited(amount=2)]),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], AppendResult) and isinstance(outcomes[2], AppendResult)
        assert isinstance(outcomes[1], StatementError), outcomes[1]
        assert sorted([e.stream_id async for e in store.read_all()]) == ["x", "y"]
