"""Growth (issue 10): the same operations on a store that already holds 0, 1 million, 10 million events.

A team sizing a system asks whether appends, loads and reads slow down as the log grows. Each
``growth_*`` scenario grows **one** store (a SQLite file, or a fresh schema on the benchmark's durable
PostgreSQL server) through the configured sizes, smallest first, filling it up to exactly each size
with large bulk appends (10,000-event streams, untimed). At each size it then measures, on the
newly opened grown store and on a fresh empty store opened beside it:

* ``append seq``: sequential ``Repository.save`` of new aggregates of 10 events (one commit each);
* ``append bulk``: one ``append`` of 10,000 events to a new stream;
* ``load``: ``Repository.get`` of an aggregate of 1,000 events (saved first, one warm-up load);
* ``read_all``: ``read_all(after=...)`` over a window of the newest 100,000 events (written just
  before as 10-event accounts; one warm-up page), decoded to typed events;
* ``catch-up``: a projection (the ``projection_catchup`` scenario's upsert per account) whose
  checkpoint is set at the start of that window, run by a ``Service`` until it reaches the head:
  100,000 events through batches committed with their checkpoint (on PostgreSQL the newest 5,000:
  a projection there runs each statement from a worker thread through the event loop, a few
  thousand events/s, so 100,000 would take minutes per repetition).

Repetitions alternate between the two stores, so that a shared host's speed drifting during the
long run falls on both alike; each figure is reported as a ratio to the empty store's (aim: within
1.25x, i.e. a throughput ratio ``>= 0.8``). On SQLite, where all of the store's work runs in the
benchmark's process, the process's CPU time per event is reported too (aim ``<= 1.25``): on a host
shared with other work it stays steady where wall-clock rates swing. The empty store holds the
events of its own measurements (about 113,000), as the grown store holds its own on top of its N.
Also reported: the space the events take per million, the events table with its indexes (SQLite ``dbstat``;
PostgreSQL ``pg_total_relation_size``: heap, TOAST and indexes), next to the events' payload
(data + metadata bytes).

Sizes: ``--growth-sizes 0,1000000,10000000`` or ``TIDINGS_BENCH_GROWTH_SIZES`` (0 is implied: the
empty store is measured beside every size); the default is ``0,1000000`` (a few minutes),
``--quick`` uses ``0,200000``. The README's figures used 0/1M/10M.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import sqlite3
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Final

from benchmarks import domain
from benchmarks.domain import AccountOpened, Deposited
from benchmarks.harness import Aim, Comparison, compare, log, settle
from benchmarks.scenarios_sqlite import Context, Scenario, open_tidings
from tidings import NO_STREAM, Event, EventStore, Projection, ProjectionTx, Repository, Service, open_store

ENV_SIZES: Final = "TIDINGS_BENCH_GROWTH_SIZES"
AIM: Final = Aim(">=", 0.8)  # within 1.25x of the empty store
CPU_AIM: Final = Aim("<=", 1.25)
_ACCOUNT_EVENTS: Final = 10
PG_CATCHUP_EVENTS: Final = 5_000


@dataclasses.dataclass(frozen=True, slots=True)
class GrowthConfig:
    """What the growth scenarios measure, and on stores of which sizes."""

    sizes: tuple[int, ...] = (0, 1_000_000)
    sequential_saves: int = 400
    bulk_events: int = 10_000
    aggregate_events: int = 1_000
    window: int = 100_000
    fill_append: int = 10_000
    fill_concurrency: int = 4
    repeats: int = 4

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 0 for s in self.sizes):
            raise ValueError(f"growth sizes must be numbers of events >= 0, got {self.sizes}")

    @classmethod
    def choose(cls, sizes: str | None, *, quick: bool) -> GrowthConfig:
        """The configuration for a run: ``sizes`` (a flag's text), else ``$TIDINGS_BENCH_GROWTH_SIZES``,
        else the default (smaller in a quick run)."""
        base = cls(sizes=(0, 200_000), sequential_saves=100, window=20_000, repeats=2) if quick else cls()
        text = sizes or os.environ.get(ENV_SIZES)
        return base if not text else dataclasses.replace(base, sizes=parse_sizes(text))


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"0,1000000,10M"`` -> ``(0, 1000000, 10000000)`` (``k``/``M`` suffixes allowed), sorted."""
    sizes: set[int] = set()
    for part in text.split(","):
        part = part.strip().replace("_", "")
        if not part:
            continue
        scale = {"k": 1_000, "K": 1_000, "m": 1_000_000, "M": 1_000_000}.get(part[-1], 1)
        digits = part[:-1] if scale != 1 else part
        try:
            value = int(float(digits) * scale)
        except ValueError:
            raise ValueError(f"growth size {part!r} is not a number of events (e.g. 0,1000000,10M)") from None
        if value < 0:
            raise ValueError(f"growth size {part!r} must be >= 0")
        sizes.add(value)
    if not sizes:
        raise ValueError(f"no growth sizes in {text!r}")
    return tuple(sorted(sizes))


def _short(n: int) -> str:
    if n >= 1_000_000 and n % 1_000_000 == 0:
        return f"{n // 1_000_000}M"
    if n >= 1_000 and n % 1_000 == 0:
        return f"{n // 1_000}k"
    return f"{n:,}"


# -- the read model caught up at each size ----------------------------------------------------------


def _window_projection(tag: str, table: str) -> Projection:
    """A projection of account balances with a table of its own (one per measurement)."""
    ref = "{" + table + "}"

    class WindowBalances(Projection):
        name = f"growth_{tag}"
        tables = {
            table: f"CREATE TABLE {ref} (account TEXT PRIMARY KEY, owner TEXT NOT NULL, "
            "balance INTEGER NOT NULL, deposits INTEGER NOT NULL)"
        }

        def opened(self, event: AccountOpened, tx: ProjectionTx) -> None:
            tx.execute(
                f"INSERT INTO {ref} (account, owner, balance, deposits) VALUES (?, ?, 0, 0) "
                "ON CONFLICT (account) DO UPDATE SET owner = excluded.owner",
                (tx.recorded.stream_id, event.owner),
            )

        def deposited(self, event: Deposited, tx: ProjectionTx) -> None:
            tx.execute(
                f"INSERT INTO {ref} (account, owner, balance, deposits) VALUES (?, '', ?, 1) "
                f"ON CONFLICT (account) DO UPDATE SET balance = {ref}.balance + excluded.balance, "
                f"deposits = {ref}.deposits + 1",
                (tx.recorded.stream_id, event.amount),
            )

    return WindowBalances()


def _account_events(i: int) -> list[Event]:
    events: list[Event] = [AccountOpened(owner=f"owner of account-{i}")]
    events.extend(Deposited(amount=k, reference=f"ref-{k:08d}") for k in range(1, _ACCOUNT_EVENTS))
    return events


# -- one backend ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Backend:
    """How to open the growing store, a fresh empty one beside it, and what space events take."""

    name: str  # row prefix: growth_sqlite, growth_pg
    label: str  # in titles
    open: Callable[[], contextlib.AbstractAsyncContextManager[EventStore]]
    """Opens the store that grows through the sizes."""
    fresh: Callable[[], contextlib.AbstractContextManager[Opener]]
    """A new empty store (a file, a schema) for the duration of one size's measurements."""
    events_bytes: Callable[[EventStore], Awaitable[int]]
    space: str  # what events_bytes counts, for the notes
    catchup_events: int | None = None
    cpu_rows: bool = False
    """Also report the process's CPU time per event (meaningful when the store runs in-process)."""
    """How many of the window's newest events the projection catches up over (None: all)."""


Opener = Callable[[], contextlib.AbstractAsyncContextManager[EventStore]]


@dataclasses.dataclass(slots=True)
class Figures:
    """Samples measured on one store, per measurement: events/s (wall clock), and the CPU time the
    process spent per event (every thread: for SQLite, all of the store's work)."""

    rate: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    cpu: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def timing(self, metric: str, events: int) -> Iterator[None]:
        settle()
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        self.rate.setdefault(metric, []).append(events / wall)
        self.cpu.setdefault(metric, []).append(1e6 * cpu / events)


@dataclasses.dataclass(slots=True)
class Step:
    """One size: the grown store's figures and the empty store's, measured side by side."""

    size: int
    grown: Figures = dataclasses.field(default_factory=Figures)
    empty: Figures = dataclasses.field(default_factory=Figures)
    bytes_per_event: float | None = None
    payload_per_event: float | None = None


async def _fill(store: EventStore, count: int, config: GrowthConfig, label: str) -> None:
    """Append ``count`` events in bulk appends of ``fill_append`` to new streams, a few in flight."""
    if count <= 0:
        return
    events = domain.deposits(config.fill_append)
    started = time.perf_counter()
    reported = started
    done = 0
    batch_no = 0
    while done < count:
        calls = []
        for _ in range(config.fill_concurrency):
            if done >= count:
                break
            take = min(config.fill_append, count - done)
            calls.append(
                store.append(
                    f"fill-{label}-{batch_no}",
                    events[:take] if take < len(events) else events,
                    expected_version=NO_STREAM,
                )
            )
            batch_no += 1
            done += take
        await asyncio.gather(*calls)
        if time.perf_counter() - reported > 30 and done < count:
            reported = time.perf_counter()
            log(f"    filled {done:,} of {count:,} ({done / (reported - started):,.0f} events/s)")
    log(f"    filled {count:,} events in {time.perf_counter() - started:.0f} s")


async def _payload_per_event(store: EventStore, after: int, count: int) -> float:
    total = 0
    seen = 0
    async for stored in store.read_all_stored(after=after, limit=count):
        total += len(stored.data) + len(stored.metadata or b"")
        seen += 1
    return total / seen if seen else 0.0


class _Side:
    """One of the two stores being measured, with what its measurements need to remember."""

    def __init__(self, store: EventStore, figures: Figures, tag: str) -> None:
        self.store = store
        self.figures = figures
        self.tag = tag
        self.repo = Repository(store, domain.Account)
        self.window_start = 0
        self.head = 0


async def _append_seq(side: _Side, config: GrowthConfig, r: int) -> None:
    per_sample = max(1, config.sequential_saves // config.repeats)
    accounts = [domain.new_account(f"seq-{side.tag}-{r}-{i}", _ACCOUNT_EVENTS) for i in range(per_sample)]
    with side.figures.timing("append_seq", per_sample * _ACCOUNT_EVENTS):
        for account in accounts:
            await side.repo.save(account)


async def _append_bulk(side: _Side, config: GrowthConfig, r: int, events: list[Event]) -> None:
    with side.figures.timing("append_bulk", len(events)):
        await side.store.append(f"bulk-{side.tag}-{r}", events, expected_version=NO_STREAM)


async def _load(side: _Side, config: GrowthConfig) -> None:
    stream = f"aggregate-{side.tag}"
    with side.figures.timing("load", config.aggregate_events):
        account = await side.repo.get(stream)
    assert account.version == config.aggregate_events


async def _write_window(side: _Side, config: GrowthConfig) -> None:
    """The newest events: 10-event accounts, written untimed, a few hundred appends at once."""
    side.window_start = await side.store.head()
    accounts = config.window // _ACCOUNT_EVENTS
    for first in range(0, accounts, 500):
        await asyncio.gather(
            *(
                side.store.append(f"window-{side.tag}-{i}", _account_events(i), expected_version=NO_STREAM)
                for i in range(first, min(first + 500, accounts))
            )
        )
    side.head = await side.store.head()
    assert side.head - side.window_start == accounts * _ACCOUNT_EVENTS, (side.head, side.window_start)
    async for _ in side.store.read_all(after=side.window_start, limit=1000):  # warm-up
        pass


async def _read_window(side: _Side) -> None:
    count = 0
    with side.figures.timing("read_all", side.head - side.window_start):
        async for _ in side.store.read_all(after=side.window_start):
            count += 1
    assert count == side.head - side.window_start, count


async def _catch_up(side: _Side, config: GrowthConfig, r: int, events: int | None) -> None:
    """A fresh projection whose checkpoint starts at the window, run until it reaches the head."""
    store, start, head = side.store, side.window_start, side.head
    if events is not None:
        start = max(start, head - events)
    table = f"growth_balances_{side.tag}_{r}"
    projection = _window_projection(f"{side.tag}_{r}", table)
    service = Service(f"growth-{side.tag}-{r}", store)
    service.add_projection(projection)
    await store.set_checkpoint(projection.group(1), start)
    with side.figures.timing("catchup", head - start):
        async with service.running():
            if not await service.wait_for(head, group=projection.name, timeout=900):
                raise TimeoutError(f"the growth projection did not reach {head}")
    accounts = (head - start) // _ACCOUNT_EVENTS  # whole accounts: both bounds are account edges
    [(rows, total)] = await store.query(f"SELECT count(*), coalesce(sum(balance), 0) FROM {table}")
    assert (int(rows), int(total)) == (accounts, accounts * sum(range(1, _ACCOUNT_EVENTS))), (rows, total)


async def _side_by_side(grown: _Side, empty: _Side, config: GrowthConfig, catchup_events: int | None) -> None:
    """Every measurement on both stores, alternating which goes first, so that the host's speed
    drifting during the run (other work on a shared machine) falls on both alike."""

    def order(r: int) -> tuple[_Side, _Side]:
        return (empty, grown) if r % 2 == 0 else (grown, empty)

    for r in range(config.repeats):
        for side in order(r):
            await _append_seq(side, config, r)
    bulk = domain.deposits(config.bulk_events)
    for r in range(config.repeats):
        for side in order(r):
            await _append_bulk(side, config, r, bulk)
    for side in (empty, grown):
        stream = f"aggregate-{side.tag}"
        await side.repo.save(domain.new_account(stream, config.aggregate_events))
        await side.repo.get(stream)  # warm-up
    for r in range(config.repeats):
        for side in order(r):
            await _load(side, config)
    for side in (empty, grown):
        await _write_window(side, config)
    for r in range(config.repeats):
        for side in order(r):
            await _read_window(side)
    for r in range(config.repeats):
        for side in order(r):
            await _catch_up(side, config, r, catchup_events)


async def _grow(backend: Backend, config: GrowthConfig) -> list[Step]:
    steps: list[Step] = []
    for size in config.sizes:
        if size == 0:
            continue  # the empty store is measured beside every size
        async with backend.open() as store:
            head = await store.head()
            if head > size:
                raise ValueError(
                    f"growth sizes must grow by more than one step's measurements ({head:,} events "
                    f"already stored before the {size:,} step)"
                )
            log(f"  {backend.label}: filling to {size:,} events")
            await _fill(store, size - head, config, _short(size))
            step = Step(size, bytes_per_event=await backend.events_bytes(store) / size)
        log(f"  {backend.label}: measuring on {size:,} events and on an empty store, alternately")
        began = time.perf_counter()
        tag = _short(size)
        with backend.fresh() as open_empty:
            # Both newly opened: no connection warmed by the fill.
            async with backend.open() as grown_store, open_empty() as empty_store:
                grown = _Side(grown_store, step.grown, f"{tag}_grown")
                empty = _Side(empty_store, step.empty, f"{tag}_empty")
                await _side_by_side(grown, empty, config, backend.catchup_events)
                step.payload_per_event = await _payload_per_event(grown_store, grown.window_start, 10_000)
        log(f"  {backend.label}: measured on {size:,} events in {time.perf_counter() - began:.0f} s")
        for metric, rates in step.grown.rate.items():
            # Logged as it comes: a run of many sizes takes long enough to be cut short.
            grown_rate, empty_rate = statistics.median(rates), statistics.median(step.empty.rate[metric])
            grown_cpu, empty_cpu = (
                statistics.median(step.grown.cpu[metric]),
                statistics.median(step.empty.cpu[metric]),
            )
            log(
                f"    {metric}: {grown_rate:,.0f} events/s vs {empty_rate:,.0f} empty "
                f"({grown_rate / empty_rate:.2f}x); CPU {grown_cpu:.1f} vs {empty_cpu:.1f} us/event"
            )
        log(f"    space: {step.bytes_per_event:.0f} bytes/event, payload {step.payload_per_event:.0f}")
        steps.append(step)
    return steps


_METRICS: Final = (
    ("append_seq", "append seq", "sequential saves of one new aggregate of 10 events"),
    ("append_bulk", "append bulk", "one append of {bulk:,} events"),
    ("load", "load", "Repository.get of an aggregate of {aggregate:,} events"),
    ("read_all", "read_all", "read_all of the newest {window:,} events, decoded"),
    ("catchup", "catch-up", "projection catch-up over the newest {catchup:,} events"),
)


def _rows(backend: Backend, config: GrowthConfig, steps: Sequence[Step]) -> list[Comparison]:
    reference = "empty store, measured alongside"
    fields = {
        "bulk": config.bulk_events,
        "aggregate": config.aggregate_events,
        "window": config.window,
        "catchup": min(config.window, backend.catchup_events or config.window),
    }
    rows: list[Comparison] = []
    for step in steps:
        for attribute, short, what in _METRICS:
            title = f"growth, {backend.label}: {what.format(**fields)}, on a grown store vs an empty one"
            rows.append(
                compare(
                    backend.name,
                    title,
                    f"events/s, {short}, {_short(step.size)} stored",
                    step.grown.rate[attribute],
                    reference,
                    step.empty.rate[attribute],
                    AIM,
                )
            )
            if backend.cpu_rows:
                rows.append(
                    compare(
                        backend.name,
                        title,
                        f"CPU us/event, {short}, {_short(step.size)} stored",
                        step.grown.cpu[attribute],
                        reference,
                        step.empty.cpu[attribute],
                        CPU_AIM,
                        note="CPU time of the whole process (every thread) per event: on SQLite all of "
                        "the store's work, and steady while other processes compete for the CPUs",
                    )
                )
    for step in steps:
        if step.bytes_per_event is None or not step.payload_per_event:
            continue
        rows.append(
            compare(
                backend.name,
                f"growth, {backend.label}: space taken by the events",
                f"MB per 1M events, {_short(step.size)} stored",
                [step.bytes_per_event],
                "event payload (data + metadata)",
                [step.payload_per_event],
                None,
                note=f"{backend.space}, divided by the number of events; the payload is the events' "
                "JSON data and metadata bytes alone",
            )
        )
    return rows


# -- SQLite ---------------------------------------------------------------------------------------------


def _sqlite_events_bytes(path: Path) -> int:
    """Bytes of the events table and its indexes (SQLite's dbstat), read on a connection of its own."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        [(total,)] = conn.execute(
            "SELECT sum(pgsize) FROM dbstat WHERE name IN "
            "('tidings_events', 'tidings_events_stream', 'tidings_events_id')"
        ).fetchall()
    return int(total or 0)


def growth_sqlite(ctx: Context, config: GrowthConfig) -> list[Comparison]:
    with ctx.workspace.fresh_db("growth") as path:

        async def events_bytes(_: EventStore) -> int:
            return await asyncio.to_thread(_sqlite_events_bytes, path)

        @contextlib.contextmanager
        def fresh() -> Iterator[Opener]:
            with ctx.workspace.fresh_db("growth-empty") as empty:
                yield lambda: open_tidings(empty)

        backend = Backend(
            "growth_sqlite",
            "SQLite",
            lambda: open_tidings(path),
            fresh,
            events_bytes,
            "the tidings_events table and its two indexes (SQLite dbstat pages)",
            cpu_rows=True,
        )
        results = asyncio.run(_grow(backend, config))
        log(f"  SQLite file: {path.stat().st_size / 1e6:,.0f} MB")
    return _rows(backend, config, results)


# -- PostgreSQL -----------------------------------------------------------------------------------------


def growth_postgres(ctx: Context, config: GrowthConfig) -> list[Comparison]:
    pg = ctx.postgres
    with pg.fresh_schema("growth") as schema:
        url = pg.tidings_url(schema)

        async def events_bytes(store: EventStore) -> int:
            [(total,)] = await store.query(
                "SELECT pg_total_relation_size(?::regclass)", [f'"{schema}".tidings_events']
            )
            return int(total)

        @contextlib.contextmanager
        def fresh() -> Iterator[Opener]:
            with pg.fresh_schema("growth_empty") as empty:
                empty_url = pg.tidings_url(empty)
                yield lambda: _open_pg(empty_url)

        backend = Backend(
            "growth_pg",
            "PostgreSQL",
            lambda: _open_pg(url),
            fresh,
            events_bytes,
            "pg_total_relation_size of tidings_events (heap, TOAST and both indexes)",
            # A projection on PostgreSQL runs each statement from a worker thread through the
            # event loop (a few thousand events/s): it catches up over the newest part of the window.
            catchup_events=PG_CATCHUP_EVENTS,
        )
        results = asyncio.run(_grow(backend, config))
    return _rows(backend, config, results)


@contextlib.asynccontextmanager
async def _open_pg(url: str) -> AsyncIterator[EventStore]:
    async with open_store(url) as store:
        yield store


def scenarios(config: GrowthConfig) -> dict[str, Scenario]:
    """The growth scenarios measuring on stores of ``config.sizes`` events."""
    sizes = "/".join(_short(s) for s in config.sizes)
    return {
        s.name: s
        for s in (
            Scenario(
                "growth_sqlite",
                f"growth on SQLite, stores of {sizes} events",
                functools.partial(growth_sqlite, config=config),
            ),
            Scenario(
                "growth_pg",
                f"growth on PostgreSQL, stores of {sizes} events",
                functools.partial(growth_postgres, config=config),
            ),
        )
    }
