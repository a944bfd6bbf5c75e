"""The scenarios: tidings' SQLite store against eventsourcing's SQLite module, same machine, same run.

Each scenario builds its inputs outside the timed section (aggregates with their pending events,
lists of events), uses fresh database files for every timed write, and times only the operation
named in its title: a save or append until it has committed, a load until the aggregate is rebuilt,
a read until the last event is decoded into its typed class. Repeated scenarios report the median.

Like for like:

* tidings saves with ``Repository.save`` / ``EventStore.append``; the peer with ``Application.save``.
  Both commit one transaction per call at ``synchronous=FULL`` in WAL mode.
* Concurrency is each library's own model: 16 asyncio tasks awaiting one tidings store, against
  16 threads saving through one eventsourcing application (it is a synchronous library).
* Loads go through each library's repository, without snapshots or caches.
* Reading the log decodes every event into its domain class on both sides, in pages of 1000.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tracemalloc
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from pathlib import Path

from benchmarks import domain, peer_eventsourcing, raw_sqlite
from benchmarks.domain import Account
from benchmarks.harness import (
    Aim,
    Comparison,
    Sizes,
    Workspace,
    compare,
    current_rss,
    log,
    sqlite_url,
    stopwatch,
)
from benchmarks.nats_server import NatsProvider
from benchmarks.pg_server import PostgresProvider
from tidings import NO_STREAM, Event, EventStore, Repository, open_store

PEER = f"eventsourcing {version('eventsourcing')}"
RAW = "raw sqlite3.executemany"


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    sizes: Sizes
    workspace: Workspace
    postgres: PostgresProvider = dataclasses.field(default_factory=PostgresProvider)
    postgres_debian: PostgresProvider = dataclasses.field(default_factory=lambda: PostgresProvider("debian"))
    nats: NatsProvider = dataclasses.field(default_factory=NatsProvider)
    results: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    """tidings' samples per scenario of this run, for rows that compare one server with another."""

    def server_pids(self) -> list[int]:
        """The servers this run started and still runs (their CPU time is the benchmark's)."""
        pids = [self.postgres.postmaster_pid(), self.postgres_debian.postmaster_pid(), self.nats.pid()]
        return [pid for pid in pids if pid is not None]


@dataclasses.dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    title: str
    run: Callable[[Context], list[Comparison]]


@contextlib.asynccontextmanager
async def open_tidings(path: Path) -> AsyncIterator[EventStore]:
    """Open a tidings SQLite store at its defaults, after checking it runs at WAL + FULL."""
    async with open_store(sqlite_url(path)) as store:
        [(journal,)] = await store.query("PRAGMA journal_mode")
        [(synchronous,)] = await store.query("PRAGMA synchronous")
        if str(journal).lower() != "wal" or int(synchronous) != 2:
            raise RuntimeError(
                f"tidings' SQLite connection has journal_mode={journal}, synchronous={synchronous}; "
                "the comparison needs wal / 2 (FULL)"
            )
        yield store


# -- append: one aggregate of 10 events per call, sequential -------------------------------------------


async def _tidings_save_sequential(path: Path, accounts: list[Account]) -> float:
    async with open_tidings(path) as store:
        repo = Repository(store, Account)
        with stopwatch() as elapsed:
            for account in accounts:
                await repo.save(account)
        return elapsed()


def append_sequential(ctx: Context) -> list[Comparison]:
    n, k = ctx.sizes.sequential_saves, ctx.sizes.events_per_aggregate
    ours: list[float] = []
    theirs: list[float] = []
    raw: list[float] = []
    for _ in range(ctx.sizes.repeats):
        accounts = [domain.new_account(f"account-{i}", k) for i in range(n)]
        with ctx.workspace.fresh_db("seq-tidings") as path:
            ours.append(n * k / asyncio.run(_tidings_save_sequential(path, accounts)))
            rows = raw_sqlite.stored_rows(path)
        peer_accounts = [peer_eventsourcing.new_account(k) for _ in range(n)]
        with ctx.workspace.fresh_db("seq-peer") as path:
            app = peer_eventsourcing.open_app(str(path))
            try:
                with stopwatch() as elapsed:
                    peer_eventsourcing.save_all(app, peer_accounts)
                theirs.append(n * k / elapsed())
            finally:
                app.close()
        with ctx.workspace.fresh_db("seq-raw") as path:
            raw.append(n * k / raw_sqlite.executemany_per_call(path, rows, k))
    title = f"append: {n:,} saves of one aggregate of {k} events, sequential"
    return [
        compare("append_sequential", title, "events/s", ours, PEER, theirs, Aim(">=", 1.5)),
        compare(
            "append_sequential",
            title,
            "events/s",
            ours,
            RAW,
            raw,
            None,
            note=f"the same rows, one BEGIN IMMEDIATE / executemany / COMMIT per {k} rows: the ceiling",
        ),
    ]


# -- append: 16 concurrent writers, one aggregate per call ---------------------------------------------


async def timed_concurrent_saves(store: EventStore, batches: list[list[Account]]) -> float:
    """Seconds for one asyncio task per batch to save its accounts through one repository.

    Shared with the PostgreSQL scenarios, which open their store differently.
    """
    repo = Repository(store, Account)

    async def writer(batch: list[Account]) -> None:
        for account in batch:
            await repo.save(account)

    with stopwatch() as elapsed:
        async with asyncio.TaskGroup() as group:
            for batch in batches:
                group.create_task(writer(batch))
    return elapsed()


async def timed_bulk_append(store: EventStore, events: list[Event]) -> float:
    """Seconds to append ``events`` to a new stream in one call (shared with PostgreSQL)."""
    with stopwatch() as elapsed:
        await store.append("bulk-1", events, expected_version=NO_STREAM)
    return elapsed()


async def _tidings_save_concurrently(path: Path, batches: list[list[Account]]) -> float:
    async with open_tidings(path) as store:
        return await timed_concurrent_saves(store, batches)


def append_concurrent(ctx: Context) -> list[Comparison]:
    writers, per_writer = ctx.sizes.concurrent_writers, ctx.sizes.saves_per_writer
    k = ctx.sizes.events_per_aggregate
    total = writers * per_writer * k
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(ctx.sizes.repeats):
        batches = [
            [domain.new_account(f"account-{w}-{i}", k) for i in range(per_writer)] for w in range(writers)
        ]
        with ctx.workspace.fresh_db("conc-tidings") as path:
            ours.append(total / asyncio.run(_tidings_save_concurrently(path, batches)))
        peer_batches = [
            [peer_eventsourcing.new_account(k) for _ in range(per_writer)] for _ in range(writers)
        ]
        with ctx.workspace.fresh_db("conc-peer") as path:
            app = peer_eventsourcing.open_app(str(path))
            try:
                theirs.append(total / peer_eventsourcing.save_concurrently(app, peer_batches))
            finally:
                app.close()
    title = (
        f"append: {writers} concurrent writers x {per_writer} saves of one aggregate of {k} events "
        "(tidings: asyncio tasks; eventsourcing: threads)"
    )
    return [compare("append_concurrent", title, "events/s", ours, PEER, theirs, Aim(">=", 5.0))]


# -- append: 10,000 events in one call --------------------------------------------------------------------


async def _tidings_append_bulk(path: Path, events: list[Event]) -> float:
    async with open_tidings(path) as store:
        return await timed_bulk_append(store, events)


def append_bulk(ctx: Context) -> list[Comparison]:
    n = ctx.sizes.bulk_events
    events = domain.deposits(n)
    ours: list[float] = []
    theirs: list[float] = []
    raw: list[float] = []
    for _ in range(ctx.sizes.repeats):
        with ctx.workspace.fresh_db("bulk-tidings") as path:
            ours.append(n / asyncio.run(_tidings_append_bulk(path, events)))
            rows = raw_sqlite.stored_rows(path)
        account = peer_eventsourcing.new_account(n)
        with ctx.workspace.fresh_db("bulk-peer") as path:
            app = peer_eventsourcing.open_app(str(path))
            try:
                with stopwatch() as elapsed:
                    app.save(account)
                theirs.append(n / elapsed())
            finally:
                app.close()
        with ctx.workspace.fresh_db("bulk-raw") as path:
            raw.append(n / raw_sqlite.executemany(path, rows))
    title = f"append: {n:,} events in one call"
    return [
        compare("append_bulk", title, "events/s", ours, PEER, theirs, Aim(">=", 3.0)),
        compare(
            "append_bulk",
            title,
            "events/s",
            ours,
            RAW,
            raw,
            Aim(">=", 0.5),
            note="the same rows tidings wrote, same table, indexes and pragmas, in one transaction",
        ),
    ]


# -- load an aggregate of 10,000 events, no snapshot -------------------------------------------------------


async def _tidings_load(path: Path, n: int, repeats: int) -> list[float]:
    async with open_tidings(path) as store:
        repo = Repository(store, Account)
        await repo.save(domain.new_account("account-1", n))
        await repo.get("account-1")  # warm-up: reader connection, page cache
        samples: list[float] = []
        for _ in range(repeats):
            with stopwatch() as elapsed:
                account = await repo.get("account-1")
            samples.append(n / elapsed())
            assert account.version == n
        return samples


def _raw_load(path: Path, n: int, repeats: int) -> list[float]:
    """The same aggregate's rows read with plain sqlite3, decoded by the same pydantic validators
    and applied to the same aggregate class: the floor of a load."""
    decoders = {
        cls.__event_type__: cls.__pydantic_validator__.validate_json
        for cls in (domain.AccountOpened, domain.Deposited)
    }
    samples: list[float] = []
    for _ in range(repeats):
        account = Account("account-1")
        samples.append(n / raw_sqlite.load_decoded(path, "account-1", decoders, account.apply))
        assert account.balance == sum(range(1, n))
    return samples


def load_aggregate(ctx: Context) -> list[Comparison]:
    n, repeats = ctx.sizes.load_events, ctx.sizes.repeats
    with ctx.workspace.fresh_db("load-tidings") as path:
        ours = asyncio.run(_tidings_load(path, n, repeats))
        raw = _raw_load(path, n, repeats)
    theirs: list[float] = []
    with ctx.workspace.fresh_db("load-peer") as path:
        app = peer_eventsourcing.open_app(str(path))
        try:
            saved = peer_eventsourcing.new_account(n)
            app.save(saved)
            peer_eventsourcing.load(app, saved.id)  # warm-up, as for tidings
            for _ in range(repeats):
                with stopwatch() as elapsed:
                    account = peer_eventsourcing.load(app, saved.id)
                theirs.append(n / elapsed())
                assert account.version == n
        finally:
            app.close()
    title = f"load: one aggregate of {n:,} events by replay, no snapshot"
    return [
        compare("load_aggregate", title, "events/s", ours, PEER, theirs, Aim(">=", 4.0)),
        compare(
            "load_aggregate",
            title,
            "events/s",
            ours,
            "raw sqlite3 read + pydantic decode",
            raw,
            Aim(">=", 0.8),
            note="the stream's rows read with plain sqlite3 in pages of 1000, each decoded by its "
            "model's JSON validator and applied to the same aggregate class: the floor",
        ),
    ]


# -- read_all: the whole log, decoded to typed events ------------------------------------------------------


_STREAM_SIZE = 1000  # events per stream when filling a log: many streams, written in big appends


async def _tidings_fill(path: Path, n: int, per_append: int) -> None:
    events = domain.deposits(per_append)
    async with open_tidings(path) as store:
        for i in range(n // per_append):
            await store.append(f"account-{i}", events, expected_version=NO_STREAM)


async def _tidings_read_all(path: Path, n: int, repeats: int) -> list[float]:
    samples: list[float] = []
    async with open_tidings(path) as store:
        last = [r.event async for r in store.read_all(after=n - 1)]
        assert isinstance(last[0], domain.Deposited)  # decoded to the typed class
        for _ in range(repeats):
            count = 0
            with stopwatch() as elapsed:
                async for _ in store.read_all():
                    count += 1
            samples.append(count / elapsed())
            assert count == n
    return samples


def read_all(ctx: Context) -> list[Comparison]:
    n, repeats = ctx.sizes.read_all_events, ctx.sizes.repeats
    with ctx.workspace.fresh_db("read-tidings") as path:
        asyncio.run(_tidings_fill(path, n, _STREAM_SIZE))
        ours = asyncio.run(_tidings_read_all(path, n, repeats))
    theirs: list[float] = []
    with ctx.workspace.fresh_db("read-peer") as path:
        app = peer_eventsourcing.open_app(str(path))
        try:
            for _ in range(n // _STREAM_SIZE):
                app.save(peer_eventsourcing.new_account(_STREAM_SIZE))
            *_, last = peer_eventsourcing.read_all(app)  # untimed: decoded to the typed class
            assert isinstance(last, peer_eventsourcing.DEPOSITED)
            for _ in range(repeats):
                count = 0
                with stopwatch() as elapsed:
                    for _ in peer_eventsourcing.read_all(app):
                        count += 1
                theirs.append(count / elapsed())
                assert count == n
        finally:
            app.close()
    title = f"read_all: {n:,} events decoded to typed events ({n // _STREAM_SIZE} streams)"
    return [compare("read_all", title, "events/s", ours, PEER, theirs, Aim(">=", 2.0))]


# -- memory: read_all stays flat as the log grows ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Footprint:
    count: int
    heap_peak: int  # tracemalloc: peak of Python allocations made during the pass
    rss_growth: int | None  # highest RSS sampled during the pass, minus RSS before it


async def _read_counted(store: EventStore, limit: int | None) -> _Footprint:
    """Iterate ``read_all`` under tracemalloc, sampling RSS every 1000 events."""
    rss_before = current_rss()
    rss_peak = rss_before or 0
    tracemalloc.start()
    try:
        count = 0
        async for _ in store.read_all(limit=limit):
            count += 1
            if count % 1000 == 0 and rss_before is not None:
                rss_peak = max(rss_peak, current_rss() or 0)
        _, heap_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return _Footprint(count, heap_peak, None if rss_before is None else rss_peak - rss_before)


async def _tidings_footprint(path: Path, limit: int | None) -> _Footprint:
    """One measured pass over the log, on a store of its own so that every pass starts cold."""
    async with open_tidings(path) as store:
        # Untraced warm-up over a few pages: every reader thread and connection, lazy validators.
        async for _ in store.read_all(limit=5000):
            pass
        return await _read_counted(store, limit)


def read_all_memory(ctx: Context) -> list[Comparison]:
    large = ctx.sizes.memory_events
    small = large // 10
    with ctx.workspace.fresh_db("memory-tidings") as path:
        log(f"  writing {large:,} events in appends of {ctx.sizes.memory_append_size:,}")
        asyncio.run(_tidings_fill(path, large, ctx.sizes.memory_append_size))
        log(f"  reading {small:,} then {large:,} events under tracemalloc")
        few = asyncio.run(_tidings_footprint(path, small))
        many = asyncio.run(_tidings_footprint(path, None))
    assert few.count == small and many.count == large
    mib = 1024 * 1024
    title = f"memory: read_all over {large:,} events vs {small:,} (tidings only)"
    rows = [
        compare(
            "read_all_memory",
            title,
            "MiB peak Python heap",
            [many.heap_peak / mib],
            f"tidings, {small:,} events",
            [few.heap_peak / mib],
            Aim("<=", 1.5),
            note="tracemalloc peak while iterating; flat means it does not grow with the number of events",
        )
    ]
    if many.rss_growth is not None and few.rss_growth is not None:
        rows.append(
            compare(
                "read_all_memory",
                title,
                "MiB RSS growth",
                [many.rss_growth / mib],
                f"tidings, {small:,} events",
                [few.rss_growth / mib],
                None,
                note="RSS sampled every 1000 events, minus RSS before the pass (each pass on a newly opened "
                "store); it includes SQLite's page cache (cache_size 64 MiB per reader connection), which "
                "fills as more of the file is read, up to that bound",
            )
        )
    return rows


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("append_sequential", "append, one aggregate of 10 events per call", append_sequential),
        Scenario("append_concurrent", "append, 16 concurrent writers", append_concurrent),
        Scenario("append_bulk", "append 10,000 events in one call", append_bulk),
        Scenario("load_aggregate", "load an aggregate of 10,000 events", load_aggregate),
        Scenario("read_all", "read_all decoded to typed events", read_all),
        Scenario("read_all_memory", "read_all memory stays flat", read_all_memory),
    )
}
"""Every scenario by name, in the order ``make bench`` runs them."""
