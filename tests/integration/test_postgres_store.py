"""The PostgreSQL store beyond the contract: URL options, migrations, schemas, errors, wake-ups."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import uuid

import psycopg
import pytest

from tests import servers
from tests.conftest import drop_schema
from tests.helpers import blocked_wait_for_append, wait_until
from tidings import (
    ConcurrencyError,
    CorruptStore,
    InvalidArgument,
    MissingExtra,
    StoreError,
    TidingsError,
    open_store,
)
from tidings.store.postgres import (
    LATEST_VERSION,
    PostgresConfig,
    PostgresStore,
    channel_name,
    migrate,
    redact,
    to_psycopg,
)
from tidings.store.tracking import DeadLetterRecord, ProcessedBatch, Tx
from tidings.testing import Credited, collect

pytestmark = pytest.mark.postgres


def schema_of(url: str) -> str:
    return PostgresConfig.from_url(url).schema


def sql(url: str, statement: str) -> list[tuple[object, ...]]:
    """Run one statement on a plain connection (outside any store)."""
    with psycopg.connect(servers.libpq_url(url), autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


# -- the extra ---------------------------------------------------------------------------------------


def test_import_without_psycopg_names_the_extra() -> None:
    script = textwrap.dedent(
        """
        import sys
        sys.modules["psycopg"] = None  # as if the extra were not installed
        from tidings import MissingExtra, open_store
        try:
            open_store("postgresql://localhost/x")
        except MissingExtra as exc:
            print(type(exc).__name__, exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("MissingExtra ")
    assert "pip install 'tidings[postgres]'" in out.stdout
    assert issubclass(MissingExtra, ImportError)


# -- URL options ---------------------------------------------------------------------------------------


def test_url_options_are_parsed_and_not_passed_to_libpq() -> None:
    config = PostgresConfig.from_url(
        "postgresql://u:secret@h:5433/db?schema=tenant_1&migrate=false&poll_interval=0.25"
        "&pool_size=3&pool_timeout=5&sslmode=disable"
    )
    assert (config.schema, config.migrate, config.poll_interval) == ("tenant_1", False, 0.25)
    assert (config.pool_size, config.pool_timeout) == (3, 5.0)
    assert "schema" not in config.conninfo and "sslmode=disable" in config.conninfo
    assert "application_name=tidings" in config.conninfo
    assert PostgresConfig.from_url("postgres://h/db").schema == "public"


@pytest.mark.parametrize(
    "query",
    [
        "schema=1abc",
        "schema=a-b",
        "schema=" + "x" * 64,
        "schema=pg_mine",
        'schema=a"b',
        "migrate=maybe",
        "poll_interval=0",
        "poll_interval=soon",
        "pool_size=0",
        "pool_size=2.5",
        "no_such_libpq_option=1",
    ],
)
def test_bad_url_options_are_rejected(query: str) -> None:
    with pytest.raises(InvalidArgument):
        open_store(f"postgresql://localhost/db?{query}")


def test_passwords_are_redacted_in_messages() -> None:
    assert "secret" not in redact("postgresql://ann:secret@h/db?password=secret&schema=x")
    assert redact("postgresql://h/db") == "postgresql://h/db"


def test_long_schema_names_get_a_valid_channel() -> None:
    assert channel_name("public") == "tidings:public"
    long = "s" * 63
    assert len(channel_name(long)) <= 63 and channel_name(long) != channel_name("t" * 63)


def test_qmark_placeholders_become_psycopg_ones() -> None:
    assert to_psycopg("SELECT * FROM t WHERE a = ? AND b = ?", (1, 2)) == (
        "SELECT * FROM t WHERE a = %s AND b = %s"
    )
    assert to_psycopg("SELECT '?', \"q?\", 5 % 2 -- why?\n, ?", (1,)) == (
        "SELECT '?', \"q?\", 5 %% 2 -- why?\n, %s"
    )
    assert to_psycopg("SELECT 'it''s ?', ?", (1,)) == "SELECT 'it''s ?', %s"
    assert to_psycopg("SELECT :a::int, :b_2", {"a": 1, "b_2": 2}) == "SELECT %(a)s::int, %(b_2)s"
    # Without parameters too: the SQL is always run with a (maybe empty) parameter sequence.
    assert to_psycopg("SELECT 5 % 2, '?'", ()) == "SELECT 5 %% 2, '?'"


# -- connecting ---------------------------------------------------------------------------------------


async def test_unreachable_server_is_a_store_error() -> None:
    port = servers.free_port()
    store = open_store(f"postgresql://postgres@127.0.0.1:{port}/postgres?connect_timeout=2")
    with pytest.raises(StoreError) as info:
        await store.open()
    assert isinstance(info.value.__cause__, psycopg.Error)  # translated and chained, not leaked
    assert str(port) in str(info.value)


async def test_missing_database_is_a_store_error(postgres_url: str) -> None:
    url = postgres_url.rsplit("/", 1)[0] + "/no_such_database_here"
    with pytest.raises(StoreError) as info:
        await open_store(url).open()
    assert "no_such_database_here" in str(info.value)


# -- migrations and schemas ------------------------------------------------------------------------------


async def test_migrate_is_idempotent(pg_url: str) -> None:
    assert await migrate(pg_url) == list(range(1, LATEST_VERSION + 1))
    assert await migrate(pg_url) == []
    async with open_store(pg_url) as store:
        await store.append("s", [Credited(amount=1)])
    assert await migrate(pg_url) == []
    rows = sql(pg_url, f'SELECT version FROM "{schema_of(pg_url)}".tidings_migrations')
    assert rows == [(v,) for v in range(1, LATEST_VERSION + 1)]


async def test_concurrent_first_starts_migrate_once(pg_url: str) -> None:
    results = await asyncio.gather(*(migrate(pg_url) for _ in range(4)))
    assert sorted(results, key=len) == [[], [], [], list(range(1, LATEST_VERSION + 1))]
    stores = [open_store(pg_url) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await asyncio.gather(*(s.append("s", [Credited(amount=i)]) for i, s in enumerate(stores)))
        assert await stores[0].head() == 3
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_opening_stores_concurrently_on_a_fresh_schema(pg_url: str) -> None:
    stores = [open_store(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    await asyncio.gather(*(s.close() for s in stores))
    rows = sql(pg_url, f'SELECT count(*) FROM "{schema_of(pg_url)}".tidings_migrations')
    assert rows == [(LATEST_VERSION,)]


async def test_two_schemas_in_one_database_do_not_see_each_other(postgres_url: str) -> None:
    a, b = f"a_{uuid.uuid4().hex}", f"b_{uuid.uuid4().hex}"
    try:
        async with (
            open_store(servers.with_options(postgres_url, schema=a)) as store_a,
            open_store(servers.with_options(postgres_url, schema=b)) as store_b,
        ):
            await store_a.append("s", [Credited(amount=1), Credited(amount=2)])
            await store_b.append("s", [Credited(amount=3)])
            assert [e.event for e in await collect(store_a.read_all())] == [
                Credited(amount=1),
                Credited(amount=2),
            ]
            assert [e.event for e in await collect(store_b.read_all())] == [Credited(amount=3)]
            assert (await store_a.head(), await store_b.head()) == (2, 1)
            assert await store_b.stream_version("s") == 1
            # a notification for one schema does not wake the other's waiters
            assert await store_b.wait_for_append(1, timeout=0.3) == 1
    finally:
        drop_schema(postgres_url, a)
        drop_schema(postgres_url, b)


async def test_migrate_false_on_an_empty_schema_is_a_clear_error(pg_url: str) -> None:
    with pytest.raises(StoreError) as info:
        await open_store(servers.with_options(pg_url, migrate="false")).open()
    assert "tidings db migrate" in str(info.value) and "migrate=false" in str(info.value)
    await migrate(pg_url)
    async with open_store(servers.with_options(pg_url, migrate="false")) as store:
        await store.append("s", [Credited(amount=1)])


async def test_schema_of_a_newer_tidings_is_refused(pg_url: str) -> None:
    await migrate(pg_url)
    schema = schema_of(pg_url)
    sql(pg_url, f"INSERT INTO \"{schema}\".tidings_migrations (version, description) VALUES (99, 'future')")
    with pytest.raises(CorruptStore) as info:
        await open_store(pg_url).open()
    assert "99" in str(info.value)
    with pytest.raises(CorruptStore):
        await migrate(pg_url)


async def test_foreign_tidings_tables_are_refused(pg_url: str) -> None:
    schema = schema_of(pg_url)
    sql(pg_url, f'CREATE SCHEMA "{schema}"')
    sql(pg_url, f'CREATE TABLE "{schema}".tidings_events (id int)')
    with pytest.raises(CorruptStore) as info:
        await open_store(pg_url).open()
    assert "tidings_migrations" in str(info.value)


async def test_other_tables_in_the_schema_are_fine(pg_url: str) -> None:
    schema = schema_of(pg_url)
    sql(pg_url, f'CREATE SCHEMA "{schema}"')
    sql(pg_url, f'CREATE TABLE "{schema}".orders (id int)')
    async with open_store(pg_url) as store:
        await store.append("s", [Credited(amount=1)])


async def test_dropped_tables_are_reported_as_corrupt(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        await store.append("s", [Credited(amount=1)])
        sql(pg_url, f'DROP TABLE "{schema_of(pg_url)}".tidings_events')
        with pytest.raises(CorruptStore) as info:
            await collect(store.read_all())
        assert isinstance(info.value.__cause__, psycopg.Error)
        with pytest.raises(CorruptStore):
            await store.append("s", [Credited(amount=2)])
    with pytest.raises(CorruptStore):
        await open_store(pg_url).open()


# -- live delivery ---------------------------------------------------------------------------------------


async def test_another_store_is_woken_by_notify(pg_url: str) -> None:
    # poll_interval is an hour: only the notification can wake the waiter in time.
    async with (
        open_store(servers.with_options(pg_url, poll_interval="3600")) as waiter,
        open_store(pg_url) as writer,
    ):
        waiting = await blocked_wait_for_append(waiter, 0)
        await writer.append("s", [Credited(amount=1)])
        while (head := await asyncio.wait_for(waiting, 30)) < 1:  # a wake-up may come early
            waiting = asyncio.create_task(waiter.wait_for_append(head, timeout=None))
        assert head == 1


async def test_lost_notification_is_covered_by_polling(pg_url: str) -> None:
    async with open_store(servers.with_options(pg_url, poll_interval="0.1")) as store:
        await store.append("s", [Credited(amount=1)])
        waiting = await blocked_wait_for_append(store, 1)
        # An append whose notification never comes: the same rows, no pg_notify.
        schema = schema_of(pg_url)
        sql(
            pg_url,
            f'WITH h AS (UPDATE "{schema}".tidings_head SET position = position + 1 RETURNING position) '
            f"INSERT INTO \"{schema}\".tidings_events SELECT h.position, 's', 2, gen_random_uuid(), "
            "'tidings.testing.Credited', 1, now(), '{\"amount\": 2}'::bytea, NULL FROM h",
        )
        while (head := await asyncio.wait_for(waiting, 30)) < 2:  # a wake-up may come early
            waiting = asyncio.create_task(store.wait_for_append(head, timeout=None))
        assert head == 2
        assert [e.event for e in await collect(store.read_stream("s"))] == [
            Credited(amount=1),
            Credited(amount=2),
        ]


async def test_listener_reconnects_after_its_connection_is_killed(pg_url: str) -> None:
    async with (
        open_store(servers.with_options(pg_url, poll_interval="3600")) as waiter,
        open_store(pg_url) as writer,
    ):
        sql(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN %' AND pid <> pg_backend_pid()",
        )
        for expected in (1, 2, 3):
            waiting = await blocked_wait_for_append(waiter, expected - 1)
            await writer.append("s", [Credited(amount=expected)])
            while (head := await asyncio.wait_for(waiting, 30)) < expected:
                waiting = asyncio.create_task(waiter.wait_for_append(head, timeout=None))
            assert head == expected


# -- broken connections -----------------------------------------------------------------------------------


async def test_killed_pool_connections_are_replaced(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        await store.append("s", [Credited(amount=1)])
        sql(
            pg_url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'tidings' AND pid <> pg_backend_pid()",
        )
        # Reads retry once on a fresh connection; an append is re-sent as an exact retry.
        assert await store.append("s", [Credited(amount=2)], expected_version=1) is not None
        assert [e.version for e in await collect(store.read_stream("s"))] == [1, 2]
        assert await store.head() == 2
        assert isinstance(store, PostgresStore) and store.statistics().connection_retries > 0


# -- group commit and the position lock ------------------------------------------------------------------


async def test_group_commit_batches_concurrent_appends(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        assert isinstance(store, PostgresStore)
        await asyncio.gather(*(store.append(f"s-{i}", [Credited(amount=i)] * 10) for i in range(40)))
        stats = store.statistics()
        assert (stats.appends, stats.events, stats.queued) == (40, 400, 0)
        assert stats.batches < 40  # appends queued while a batch was in flight went together


async def test_stores_racing_on_one_stream_redo_under_the_lock(pg_url: str) -> None:
    # Several stores (as several processes would) append to one stream with ANY: their version
    # reads go stale, the unique index rejects the insert, and the batch is redone under the lock.
    stores = [open_store(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        results = await asyncio.gather(
            *(s.append("hot", [Credited(amount=i)] * 3) for i in range(25) for s in stores)
        )
        assert sorted(r.version for r in results) == list(range(3, 301, 3))
        assert [e.version for e in await collect(stores[0].read_stream("hot"))] == list(range(1, 301))
        assert [e.position for e in await collect(stores[0].read_all())] == list(range(1, 301))
        redos = sum(s.statistics().locked_redos for s in stores if isinstance(s, PostgresStore))
        assert redos > 0, "the race never happened; the test proves nothing"
    finally:
        await asyncio.gather(*(s.close() for s in stores))


# -- processing primitives -------------------------------------------------------------------------------


async def test_commit_processed_writes_everything_in_one_transaction(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        assert isinstance(store, PostgresStore)
        await store.append("in", [Credited(amount=1)])
        [recorded] = await collect(store.read_all())

        def work(tx: Tx) -> None:
            tx.execute("CREATE TABLE IF NOT EXISTS totals (k text PRIMARY KEY, v int)")
            tx.execute("INSERT INTO totals VALUES (?, ?)", ("a", 41))
            row = tx.fetchone("SELECT v + 1 FROM totals WHERE k = ?", ("a",))
            assert row == (42,)

        results = await store.commit_processed(
            ProcessedBatch(
                group="g",
                expected_checkpoint=0,
                checkpoint=1,
                work=work,
                appends=(store.prepare_append("out", [Credited(amount=2)]),),
                processed=((recorded.event_id, 1),),
                dead_letters=(
                    DeadLetterRecord(1, recorded.event_id, "in", recorded.event_type, "E", "tb", 3),
                ),
            )
        )
        assert [(r.version, r.position) for r in results] == [(1, 2)]
        assert await store.load_checkpoint("g") == 1
        assert await store.processed_ids("g", [recorded.event_id, uuid.uuid4()]) == {recorded.event_id}
        [letter] = await store.dead_letters("g")
        assert (letter.event_id, letter.attempts, letter.error) == (recorded.event_id, 3, "E")
        assert await store.query("SELECT k, v FROM totals WHERE v > ?", (1,)) == [("a", 41)]

        def failing(tx: Tx) -> None:
            tx.execute("INSERT INTO totals VALUES (?, ?)", ("b", 1))
            raise RuntimeError("boom")

        from tidings import CheckpointConflict

        with pytest.raises(CheckpointConflict):
            await store.commit_processed(ProcessedBatch("g", 0, 2, work=work))
        with pytest.raises(RuntimeError):
            await store.commit_processed(ProcessedBatch("g", 1, 2, work=failing))
        with pytest.raises(ConcurrencyError):
            await store.commit_processed(
                ProcessedBatch(
                    "g",
                    1,
                    2,
                    appends=(store.prepare_append("out", [Credited(amount=3)], expected_version=0),),
                )
            )
        # none of the failed steps wrote anything
        assert await store.load_checkpoint("g") == 1
        assert await store.query("SELECT count(*) FROM totals") == [(1,)]
        assert await store.head() == 2
        assert await store.discard_dead_letter(letter.id)
        await store.set_checkpoint("g", None)
        assert await store.checkpoints() == {}
        assert await store.processed_ids("g", [recorded.event_id]) == set()


async def test_transaction_runs_sync_code_in_the_store_schema(pg_url: str) -> None:
    async with open_store(pg_url) as store:

        def create(tx: Tx) -> int:
            assert tx.dialect == "postgresql"
            tx.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
            tx.executemany("INSERT INTO notes (body) VALUES (?)", [("a",), ("b%",), ("?",)])
            return len(tx.fetchall("SELECT * FROM notes"))

        assert await store.transaction(create) == 3
        assert await store.query("SELECT body FROM notes WHERE body LIKE ? ORDER BY id", ("b%",)) == [("b%",)]
        tables = sql(
            pg_url,
            f"SELECT table_schema FROM information_schema.tables WHERE table_name = 'notes' "
            f"AND table_schema = '{schema_of(pg_url)}'",
        )
        assert tables == [(schema_of(pg_url),)]


async def test_cancelled_transaction_runs_nothing_outside_it(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        await store.transaction(lambda tx: tx.execute("CREATE TABLE rows (n int)"))
        started, release = threading.Event(), threading.Event()
        txs: list[Tx] = []

        def work(tx: Tx) -> None:
            txs.append(tx)
            tx.execute("INSERT INTO rows VALUES (1)")
            started.set()
            release.wait(30)
            tx.execute("INSERT INTO rows VALUES (2)")  # must not run once the caller is cancelled

        task = asyncio.create_task(store.transaction(work))
        await asyncio.to_thread(started.wait, 30)
        task.cancel()
        # The cancellation reached the store: it closed the transaction to further statements.
        await wait_until(lambda: getattr(txs[0], "closed", False), 10, "the transaction to be closed")
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await store.query("SELECT count(*) FROM rows") == [(0,)]


async def test_driver_errors_in_transactions_are_translated(pg_url: str) -> None:
    async with open_store(pg_url) as store:
        with pytest.raises(StoreError) as info:
            await store.transaction(lambda tx: tx.execute("SELECT * FROM no_such_table"))
        assert isinstance(info.value, TidingsError) and isinstance(info.value.__cause__, psycopg.Error)
        with pytest.raises(StoreError):
            await store.query("SELEC nonsense")


# -- the hypothesis model of the store, on PostgreSQL --------------------------------------------------------


def test_store_model_on_postgres(postgres_url: str) -> None:
    from hypothesis import settings
    from hypothesis.stateful import run_state_machine_as_test

    from tests.unit.test_store_model import StoreMachine

    class PostgresMachine(StoreMachine):
        def __init__(self) -> None:
            self.schema = f"m_{uuid.uuid4().hex}"
            self.url_template = servers.with_options(postgres_url, schema=self.schema)
            super().__init__()

        def teardown(self) -> None:
            try:
                super().teardown()
            finally:
                drop_schema(postgres_url, self.schema)

    run_state_machine_as_test(
        PostgresMachine, settings=settings(max_examples=20, stateful_step_count=20, deadline=None)
    )
