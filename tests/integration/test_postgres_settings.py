"""The PostgreSQL store as users run it: JIT off whatever the server says, libpq options from the
URL intact, a bounded connect timeout, no password in messages, and the SQL of queries, projections
and handlers (``?`` placeholders, ``%``, literals of every kind, JSON operators) reaching the server
as written. Checkpoint resets that race with a runner's step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from tests import servers
from tests.helpers import wait_until
from tidings import StoreUnavailable, open_store
from tidings.store.postgres import PostgresConfig, PostgresStore, redact
from tidings.store.tracking import ProcessedBatch, Tx
from tidings.testing import Credited

pytestmark = pytest.mark.postgres


# -- JIT ---------------------------------------------------------------------------------------------


@pytest.fixture
def jit_everywhere_url(postgres_url: str) -> Iterator[str]:
    """A fresh database whose server-side settings JIT-compile every statement."""
    name = f"jit_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(servers.libpq_url(postgres_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        for setting in (
            "jit = on",
            "jit_above_cost = 0",
            "jit_inline_above_cost = 0",
            "jit_optimize_above_cost = 0",
        ):
            conn.execute(f'ALTER DATABASE "{name}" SET {setting}')
    url = postgres_url.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with psycopg.connect(servers.libpq_url(postgres_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


PLAN = "EXPLAIN (ANALYZE, FORMAT JSON) SELECT sum(x) FROM generate_series(1, 1000) AS x"


@pytest.mark.parametrize("postgres_flavour", servers.flavours(), scope="session")
async def test_store_sessions_never_jit_compile(jit_everywhere_url: str) -> None:
    with psycopg.connect(jit_everywhere_url, autocommit=True) as plain:
        # The fault is real: outside the store, this database JIT-compiles every statement ...
        assert plain.execute("SHOW jit").fetchone() == ("on",)
        assert plain.execute("SHOW jit_above_cost").fetchone() == ("0",)
        [jit_available] = plain.execute("SELECT pg_jit_available()").fetchone() or [False]
        if jit_available:  # ... and on a JIT-capable build (Debian's) it really does
            [[plan]] = plain.execute(PLAN).fetchall()
            assert "JIT" in plan[0]
    async with open_store(jit_everywhere_url) as store:
        assert isinstance(store, PostgresStore)
        await store.append("s", [Credited(amount=1)])
        assert await store.query("SHOW jit") == [("off",)]
        assert await store.transaction(lambda tx: tx.fetchone("SHOW jit")) == ("off",)
        [[plan]] = await store.query(PLAN)
        assert "JIT" not in plan[0]
        # Every pooled connection, not only the first one: four transactions held open together
        # (each waits in its transaction for the others) run on four connections.
        together = threading.Barrier(4, timeout=30)

        def show_jit(tx: Tx) -> tuple[object, ...] | None:
            together.wait()
            return tx.fetchone("SELECT pg_backend_pid(), current_setting('jit')")

        sessions = await asyncio.gather(*(store.transaction(show_jit) for _ in range(4)))
        assert len({pid for pid, _ in sessions}) == 4
        assert [jit for _, jit in sessions] == ["off"] * 4


# -- URL options -------------------------------------------------------------------------------------


async def test_libpq_options_with_spaces_reach_the_server_intact(pg_url: str) -> None:
    url = f"{pg_url}&application_name=billing%20worker&options=-c%20statement_timeout%3D1000"
    async with open_store(url) as store:
        assert await store.query("SHOW application_name") == [("billing worker",)]
        assert await store.query("SHOW statement_timeout") == [("1s",)]
        assert await store.transaction(lambda tx: tx.fetchone("SHOW statement_timeout")) == ("1s",)
        # The LISTEN connection too.
        [(count,)] = await store.query(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = ? AND query LIKE 'LISTEN%'",
            ("billing worker",),
        )
        assert count == 1


def test_url_options_keep_plus_signs_and_write_spaces_as_percent_20() -> None:
    config = PostgresConfig.from_url("postgresql://h/db?application_name=a+b%20c&schema=s")
    assert "application_name=a%2Bb%20c" in config.conninfo
    assert psycopg.conninfo.conninfo_to_dict(config.conninfo)["application_name"] == "a+b c"


def test_connect_timeout_defaults_to_ten_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    params = psycopg.conninfo.conninfo_to_dict(PostgresConfig.from_url("postgresql://h/db").conninfo)
    assert params["connect_timeout"] == "10"
    params = psycopg.conninfo.conninfo_to_dict(
        PostgresConfig.from_url("postgresql://h/db?connect_timeout=3").conninfo
    )
    assert params["connect_timeout"] == "3"
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "4")  # libpq's own variable is honoured
    assert "connect_timeout" not in PostgresConfig.from_url("postgresql://h/db").conninfo


def test_passwords_in_query_parameters_are_redacted() -> None:
    url = "postgresql://ann:s1@h/db?password=s2&sslpassword=s3&pass%77ord=s4&schema=x"
    for shown in (redact(url), open_store(url).safe_url):
        assert not any(secret in shown for secret in ("s1", "s2", "s3", "s4")), shown
        assert "password=***" in shown and "schema=x" in shown


# -- connect timeout ---------------------------------------------------------------------------------


@pytest.fixture
async def silent_server() -> AsyncIterator[tuple[int, list[asyncio.StreamWriter]]]:
    """A TCP server on 127.0.0.1 that accepts connections and never says a word."""
    accepted: list[asyncio.StreamWriter] = []
    gone = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        await gone.wait()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, accepted
        gone.set()
        for writer in accepted:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def test_a_server_that_never_answers_fails_the_open_within_the_timeout(
    silent_server: tuple[int, list[asyncio.StreamWriter]],
) -> None:
    port, accepted = silent_server
    store = open_store(f"postgresql://postgres:hunter2@127.0.0.1:{port}/postgres?connect_timeout=2")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    elapsed = time.monotonic() - started
    assert accepted, "the connection attempt never reached the silent server"
    assert elapsed < 30, f"open() took {elapsed:.0f} s"  # a hang check: without a timeout, ~130 s
    assert info.value.transient and "connect_timeout" in str(info.value)
    assert "hunter2" not in str(info.value)


# -- SQL translation, on the server ------------------------------------------------------------------

# (sql, params, rows): each case is run through store.query, a Tx and (named) a Tx with a mapping.
SQL_CASES: list[tuple[str, tuple[object, ...], list[tuple[object, ...]]]] = [
    ("SELECT 'ab' LIKE 'a%'", (), [(True,)]),
    ("SELECT 7 % 2", (), [(1,)]),
    ("SELECT 'ab' LIKE ? || '%'", ("a",), [(True,)]),
    ("SELECT E'it\\'s ?', ?::int", (1,), [("it's ?", 1)]),
    ("SELECT E'100%\\\\'", (), [("100%\\",)]),
    ("SELECT $$it's ? 100%$$, ?::int", (1,), [("it's ? 100%", 1)]),
    ("SELECT $fn$ $$ ? $fn$, ?::int", (1,), [(" $$ ? ", 1)]),
    ('SELECT 1 AS "a?b", ?::int', (2,), [(1, 2)]),
    ("SELECT ?::int -- why? 100%\n, ?::int", (1, 2), [(1, 2)]),
    ("SELECT /* ? /* ? */ ? */ ?::int", (1,), [(1,)]),
    ("SELECT '{\"a\": 1}'::jsonb ?? 'a'", (), [(True,)]),
    ("SELECT '{\"a\": 1}'::jsonb ??| array['b', ?]", ("a",), [(True,)]),
    ("SELECT '{\"a\": 1}'::jsonb ??& array['a', ?]", ("b",), [(False,)]),
    ("SELECT jsonb_exists('{\"a\": 1}'::jsonb, ?)", ("a",), [(True,)]),
]


@pytest.mark.parametrize(("sql", "params", "rows"), SQL_CASES)
async def test_sql_reaches_the_server_as_written(
    pg_url: str, sql: str, params: tuple[object, ...], rows: list[tuple[object, ...]]
) -> None:
    async with open_store(pg_url) as store:
        assert await store.query(sql, params) == rows
        assert await store.transaction(lambda tx: tx.fetchall(sql, params)) == rows
        assert await store.transaction(lambda tx: tx.execute(sql, params).fetchall()) == rows


NAMED_CASES: list[tuple[str, dict[str, object], list[tuple[object, ...]]]] = [
    ("SELECT :a::int % 2, '100%', E':a\\\\'", {"a": 7}, [(1, "100%", ":a\\")]),
    ("SELECT $$:a$$, :a::text, '{\"k\": 1}'::jsonb ? :a", {"a": "k"}, [(":a", "k", True)]),
    ("SELECT '{\"k\": 1}'::jsonb ?? :a", {"a": "x"}, [(False,)]),
]


@pytest.mark.parametrize(("sql", "params", "rows"), NAMED_CASES)
async def test_named_parameters_reach_the_server_as_written(
    pg_url: str, sql: str, params: dict[str, object], rows: list[tuple[object, ...]]
) -> None:
    async with open_store(pg_url) as store:
        assert await store.transaction(lambda tx: tx.execute(sql, params).fetchall()) == rows


async def test_json_operators_in_projection_and_handler_sql(pg_url: str) -> None:
    async with open_store(pg_url) as store:

        def project(tx: Tx) -> None:
            tx.execute("CREATE TABLE carts (id text PRIMARY KEY, items jsonb NOT NULL)")
            tx.execute("INSERT INTO carts VALUES (?, ?::jsonb)", ("c1", '{"sku-1": 2}'))
            tx.execute("INSERT INTO carts VALUES (?, ?::jsonb)", ("c2", "{}"))
            tx.execute("UPDATE carts SET items = items || '{\"gift\": 1}' WHERE items ?? ?", ("sku-1",))

        await store.transaction(project)
        query = "SELECT id FROM carts WHERE items ??& array['sku-1', ?]"
        assert await store.query(query, ("gift",)) == [("c1",)]
        assert await store.query("SELECT id FROM carts WHERE NOT items ??| array['sku-1']") == [("c2",)]
        query = "SELECT id FROM carts WHERE jsonb_exists_all(items, array['gift'])"
        assert await store.query(query) == [("c1",)]


async def test_multi_statement_ddl_without_parameters(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        await store.transaction(
            lambda tx: tx.execute("CREATE TABLE a (x int); CREATE TABLE b (y text DEFAULT '100%')")
        )
        await store.transaction(lambda tx: tx.execute("INSERT INTO b DEFAULT VALUES"))
        assert await store.query("SELECT y FROM b") == [("100%",)]


# -- checkpoint resets racing with a runner --------------------------------------------------------


async def test_a_reset_during_a_runners_step_is_not_overwritten(pg_url: str) -> None:
    """A runner's step holds the group's lock from its compare-and-set read to its commit. A reset
    made meanwhile waits for it and then wins; before the fix it committed at once and the step,
    which had read the old checkpoint, overwrote it."""
    async with open_store(pg_url) as store:
        for i in range(3):
            await store.append(f"s-{i}", [Credited(amount=i)])
        await store.set_checkpoint("g", 2)
        in_step, release = threading.Event(), threading.Event()

        def work(tx: Tx) -> None:
            in_step.set()
            if not release.wait(timeout=30):
                raise AssertionError("never released")

        step = asyncio.ensure_future(store.commit_processed(ProcessedBatch("g", 2, 3, work=work)))
        try:
            assert await asyncio.to_thread(in_step.wait, 30)
            reset = asyncio.ensure_future(store.set_checkpoint("g", None))
            # The race is real: the reset is under way while the step is between its read and its
            # commit. It must wait for the step's lock (before the fix it finished here, unopposed).

            async def reset_waits_or_is_done() -> bool:
                return reset.done() or await asyncio.to_thread(_advisory_lock_waiters, pg_url) > 0

            await wait_until(reset_waits_or_is_done, 30, "the reset to wait for the step's lock")
            reset_done_early = reset.done()
        finally:
            release.set()
        await step
        await reset
        assert await store.load_checkpoint("g") == 0  # the reset won (before the fix: 3, the step's)
        assert not reset_done_early, "the reset did not wait for the step in flight"


def _advisory_lock_waiters(url: str) -> int:
    with psycopg.connect(servers.libpq_url(url), autocommit=True) as conn:
        [(count,)] = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchall()
        return int(count)
