"""Footprint (issue 10): memory that stays flat as the log grows, and a service that idles cheaply.

``footprint`` (tidings only, SQLite) writes two logs, of N/10 and N events (default N = 1,000,000;
streams of 1,000 events), and on each, every pass on a newly opened store:

* ``read_all`` over the whole log, decoded to typed events;
* projection catch-up: a :class:`~tidings.Service` running a fresh projection (an upsert per
  event into one row per stream) from the start of the log to its head;
* projection rebuild: :func:`~tidings.rebuild_projection` of that projection, blue/green, from the
  start of the log.

Each pass runs under ``tracemalloc`` (the peak of Python allocations during it) while a thread
samples the process's RSS every 20 ms (the highest sample minus the RSS before the pass). A flat
footprint means the large log's figures match the small log's: the aim is at most 1.5x for the
heap; RSS is shown without an aim, as it includes SQLite's page caches (8 MiB per reader
connection, 64 MiB for the writer), which fill up to their bound as more of the file is read.

``idle`` then runs a service with 20 subscriptions (10 ``@service.handles`` handlers and 10
projections) on a SQLite store whose log they have all processed, and measures the CPU time the
whole process uses (every thread: ``resource.getrusage``) over 10 seconds of nothing to do. The
aim is under 1% of one core.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import resource
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Final

from benchmarks import domain
from benchmarks.domain import AccountOpened, Deposited
from benchmarks.harness import Aim, Comparison, compare, current_rss, log, settle
from benchmarks.scenarios_sqlite import Context, Scenario, open_tidings
from tidings import NO_STREAM, EventStore, Projection, ProjectionTx, Service, rebuild_projection

_STREAM: Final = 1_000
_MIB: Final = 1024 * 1024
IDLE_SUBSCRIPTIONS: Final = 20
IDLE_SECONDS: Final = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Footprint:
    """One measured pass: what it processed, its peak Python heap and its RSS growth (bytes)."""

    count: int
    heap_peak: int
    rss_growth: int | None


class _RssSampler:
    """A thread that records the highest RSS of the process while a pass runs."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.before = current_rss()
        self.peak = self.before or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="footprint-rss", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss() or 0)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[_RssSampler]:
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, current_rss() or 0)

    @property
    def growth(self) -> int | None:
        return None if self.before is None else self.peak - self.before


async def measured(work: Callable[[], Awaitable[int]]) -> Footprint:
    """Run ``work`` (returning how many events it processed) under tracemalloc and the RSS sampler."""
    settle()
    sampler = _RssSampler()
    tracemalloc.start()
    try:
        with sampler.sampling():
            count = await work()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return Footprint(count, peak, sampler.growth)


class StreamTotals(Projection):
    """One row per stream: the number of events and the sum of the deposits."""

    name = "footprint_totals"
    tables = {
        "footprint_totals": "CREATE TABLE {footprint_totals} (stream TEXT PRIMARY KEY, "
        "events INTEGER NOT NULL, amount INTEGER NOT NULL)"
    }
    _UPSERT = (
        "INSERT INTO {footprint_totals} (stream, events, amount) VALUES (?, 1, ?) "
        "ON CONFLICT (stream) DO UPDATE SET events = {footprint_totals}.events + 1, "
        "amount = {footprint_totals}.amount + excluded.amount"
    )

    def opened(self, event: AccountOpened, tx: ProjectionTx) -> None:
        tx.execute(self._UPSERT, (tx.recorded.stream_id, 0))

    def deposited(self, event: Deposited, tx: ProjectionTx) -> None:
        tx.execute(self._UPSERT, (tx.recorded.stream_id, event.amount))


async def _fill(path: Path, n: int) -> None:
    per_stream = min(_STREAM, n)
    streams, rest = divmod(n, per_stream)
    assert not rest, f"{n} events do not fill streams of {per_stream}"
    events = domain.deposits(per_stream)
    async with open_tidings(path) as store:
        for first in range(0, streams, 20):
            await asyncio.gather(
                *(
                    store.append(f"account-{i}", events, expected_version=NO_STREAM)
                    for i in range(first, min(first + 20, streams))
                )
            )


async def _warm(store: EventStore) -> None:
    """Untraced: open every reader connection and build the lazy validators before measuring."""
    async for _ in store.read_all(limit=5000):
        pass


async def _read_all_pass(path: Path) -> Footprint:
    async with open_tidings(path) as store:
        await _warm(store)

        async def work() -> int:
            count = 0
            async for _ in store.read_all():
                count += 1
            return count

        return await measured(work)


async def _totals(store: EventStore) -> int:
    [(events,)] = await store.query("SELECT coalesce(sum(events), 0) FROM footprint_totals")
    return int(events)


async def _catchup_pass(path: Path) -> Footprint:
    async with open_tidings(path) as store:
        await _warm(store)
        head = await store.head()

        async def work() -> int:
            service = Service("footprint", store)
            service.add_projection(StreamTotals())
            async with service.running():
                if not await service.wait_for(head, group=StreamTotals.name, timeout=1800):
                    raise TimeoutError(f"the footprint projection did not reach {head}")
            return await _totals(store)

        return await measured(work)


async def _rebuild_pass(path: Path) -> Footprint:
    async with open_tidings(path) as store:
        await _warm(store)

        async def work() -> int:
            await rebuild_projection(store, StreamTotals())
            return await _totals(store)

        return await measured(work)


def _pair(
    title: str, what: str, small: Footprint, large: Footprint, sizes: tuple[int, int]
) -> list[Comparison]:
    reference = f"tidings, {sizes[0]:,} events"
    rows = [
        compare(
            "footprint",
            title,
            f"MiB peak Python heap, {what}",
            [large.heap_peak / _MIB],
            reference,
            [small.heap_peak / _MIB],
            Aim("<=", 1.5),
            note="tracemalloc peak during the pass; flat (about 1x) means it does not grow with the log",
        )
    ]
    if small.rss_growth is not None and large.rss_growth is not None:
        rows.append(
            compare(
                "footprint",
                title,
                f"MiB RSS growth, {what}",
                [large.rss_growth / _MIB],
                reference,
                [small.rss_growth / _MIB],
                None,
                note="highest RSS sampled every 20 ms minus RSS before the pass; it includes SQLite's page "
                "caches (8 MiB per reader connection, 64 MiB for the writer), bounded, filling as more "
                "of the file is read",
            )
        )
    return rows


def memory(ctx: Context, large: int) -> list[Comparison]:
    small = large // 10
    passes: dict[str, tuple[Footprint, Footprint]] = {}
    with (
        ctx.workspace.fresh_db("footprint-small") as small_path,
        ctx.workspace.fresh_db("footprint-large") as large_path,
    ):
        log(f"  writing {small:,} and {large:,} events")
        asyncio.run(_fill(small_path, small))
        asyncio.run(_fill(large_path, large))
        for name, run in (
            ("read_all", _read_all_pass),
            ("catch-up", _catchup_pass),
            ("rebuild", _rebuild_pass),
        ):
            log(f"  {name} over {small:,} then {large:,} events under tracemalloc")
            few, many = asyncio.run(run(small_path)), asyncio.run(run(large_path))
            assert (few.count, many.count) == (small, large), (name, few.count, many.count)
            passes[name] = (few, many)
    rows: list[Comparison] = []
    for name, (few, many) in passes.items():
        title = f"footprint: {name} over {large:,} events vs {small:,} (tidings only, SQLite)"
        rows.extend(_pair(title, name, few, many, (small, large)))
    return rows


# -- an idle service ------------------------------------------------------------------------------------


def _idle_projection(i: int) -> Projection:
    table = f"idle_totals_{i}"
    ref = "{" + table + "}"

    class IdleTotals(Projection):
        name = f"idle_{i}"
        tables = {table: f"CREATE TABLE {ref} (stream TEXT PRIMARY KEY, amount INTEGER NOT NULL)"}

        def deposited(self, event: Deposited, tx: ProjectionTx) -> None:
            tx.execute(
                f"INSERT INTO {ref} (stream, amount) VALUES (?, ?) ON CONFLICT (stream) "
                f"DO UPDATE SET amount = {ref}.amount + excluded.amount",
                (tx.recorded.stream_id, event.amount),
            )

    return IdleTotals()


def idle_service(store: EventStore, subscriptions: int) -> Service:
    """A service with ``subscriptions`` subscriptions: half handlers, half projections."""
    service = Service("idle", store)
    handled = [0] * (subscriptions // 2)

    def add_handler(i: int) -> None:
        @service.handles(Deposited, group=f"idle.handler_{i}")
        async def on_deposit(event: Deposited) -> None:
            handled[i] += 1

    for i in range(subscriptions // 2):
        add_handler(i)
    for i in range(subscriptions - subscriptions // 2):
        service.add_projection(_idle_projection(i))
    return service


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return usage.ru_utime + usage.ru_stime


async def _idle_cpu(path: Path, subscriptions: int, seconds: float) -> float:
    """Percent of one core the process uses while a caught-up service with nothing to do runs."""
    async with open_tidings(path) as store:
        result = await store.append("idle-1", domain.deposits(100), expected_version=NO_STREAM)
        service = idle_service(store, subscriptions)
        async with service.running():
            if not await service.wait_for(result.position, timeout=120):
                raise TimeoutError("the idle service's subscriptions did not catch up")
            await asyncio.sleep(2 * service.config.poll_interval)  # let the last commits settle
            cpu, wall = _cpu_seconds(), time.perf_counter()
            await asyncio.sleep(seconds)
            cpu, wall = _cpu_seconds() - cpu, time.perf_counter() - wall
        return 100 * cpu / wall


def idle(ctx: Context, subscriptions: int, seconds: float) -> list[Comparison]:
    with ctx.workspace.fresh_db("footprint-idle") as path:
        percent = asyncio.run(_idle_cpu(path, subscriptions, seconds))
    title = (
        f"footprint: a service with {subscriptions} subscriptions ({subscriptions // 2} handlers, "
        f"{subscriptions - subscriptions // 2} projections) on SQLite, caught up and idle for {seconds:g} s"
    )
    return [
        compare(
            "footprint",
            title,
            "% of one core, idle service",
            [percent],
            "aim: 1% of one core",
            [1.0],
            Aim("<=", 1.0),
            note="CPU time of the whole process (every thread, resource.getrusage) over the idle "
            "seconds, divided by the wall time",
        )
    ]


def footprint(ctx: Context) -> list[Comparison]:
    return [*memory(ctx, ctx.sizes.memory_events), *idle(ctx, IDLE_SUBSCRIPTIONS, IDLE_SECONDS)]


SCENARIOS: dict[str, Scenario] = {
    "footprint": Scenario(
        "footprint", "memory over 1M events (read_all, catch-up, rebuild) and an idle service", footprint
    )
}
