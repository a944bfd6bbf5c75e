"""Processing on SQLite (issue 3): projection catch-up and live delivery latency, side by side.

``projection_catchup``
    A log of accounts (10 events each: an opening, then deposits) is written once per library, then
    copied to a fresh file for every repetition, so that each run starts from the same bytes with
    an empty read model. tidings runs a :class:`~tidings.Projection` through a
    :class:`~tidings.Service` (``service.running()`` then ``service.wait_for(head, group=name)``),
    which commits each batch of upserts with its checkpoint; the peer runs eventsourcing's
    ``ProjectionRunner`` with a materialised view that commits each upsert with its tracking record
    (see :mod:`benchmarks.peer_processing`). Both upsert one row per account with the same SQL, in
    the events' own database file, at ``synchronous=FULL``, and both read models are checked
    afterwards (row count and total balance).

``live_latency``
    One process, one writer appending one event at a time. Latency is the time from just before
    the append (``store.append`` / ``Application.save``) to the start of the handler for that event
    (a ``@service.handles`` function / the follower's ``policy``). After each event the writer
    waits until the handler's checkpoint (tracking record) is committed too, so every append starts
    from a quiet system. The first ``latency_warmup`` events are not counted.
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import statistics
from contextlib import closing
from pathlib import Path
from time import perf_counter

from benchmarks import peer_eventsourcing, peer_processing
from benchmarks.domain import AccountOpened, Deposited
from benchmarks.harness import Aim, Comparison, compare, log, settle
from benchmarks.scenarios_sqlite import PEER, Context, Scenario, open_tidings
from tidings import NO_STREAM, Event, Projection, ProjectionTx, Service

_ACCOUNT_EVENTS = 10  # events per account: an opening and nine deposits
_FILL_CHUNK = 500  # accounts written per round of concurrent appends / per peer save


class Balances(Projection):
    """One row per account: owner, balance and number of deposits (upserted)."""

    name = "balances"
    tables = {
        "balances": "CREATE TABLE {balances} (account TEXT PRIMARY KEY, owner TEXT NOT NULL, "
        "balance INTEGER NOT NULL, deposits INTEGER NOT NULL)"
    }

    def opened(self, event: AccountOpened, tx: ProjectionTx) -> None:
        assert tx.recorded is not None
        tx.execute(
            "INSERT INTO {balances} (account, owner, balance, deposits) VALUES (?, ?, 0, 0) "
            "ON CONFLICT (account) DO UPDATE SET owner = excluded.owner",
            (tx.recorded.stream_id, event.owner),
        )

    def deposited(self, event: Deposited, tx: ProjectionTx) -> None:
        assert tx.recorded is not None
        tx.execute(
            "INSERT INTO {balances} (account, owner, balance, deposits) VALUES (?, '', ?, 1) "
            "ON CONFLICT (account) DO UPDATE SET balance = {balances}.balance + excluded.balance, "
            "deposits = {balances}.deposits + 1",
            (tx.recorded.stream_id, event.amount),
        )


def _expected_totals(accounts: int) -> tuple[int, int]:
    return accounts, accounts * sum(range(1, _ACCOUNT_EVENTS))


def _account_events(i: int) -> list[Event]:
    events: list[Event] = [AccountOpened(owner=f"owner of account-{i}")]
    events.extend(Deposited(amount=k, reference=f"ref-{k:08d}") for k in range(1, _ACCOUNT_EVENTS))
    return events


async def _tidings_fill(path: Path, accounts: int) -> int:
    async with open_tidings(path) as store:
        for start in range(0, accounts, _FILL_CHUNK):
            await asyncio.gather(
                *(
                    store.append(f"account-{i}", _account_events(i), expected_version=NO_STREAM)
                    for i in range(start, min(start + _FILL_CHUNK, accounts))
                )
            )
        return await store.head()


def _peer_fill(path: Path, accounts: int) -> int:
    app = peer_eventsourcing.open_app(str(path))
    try:
        for start in range(0, accounts, _FILL_CHUNK):
            batch = []
            for _ in range(start, min(start + _FILL_CHUNK, accounts)):
                batch.append(peer_eventsourcing.new_account(_ACCOUNT_EVENTS))
            app.save(*batch)
        return int(app.recorder.max_notification_id() or 0)
    finally:
        app.close()


def _checkpointed_copy(source: Path, target: Path) -> None:
    """Copy a closed SQLite database file after folding its WAL into it."""
    with closing(sqlite3.connect(source)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copyfile(source, target)


async def _tidings_catchup(path: Path, head: int) -> tuple[float, tuple[int, int]]:
    async with open_tidings(path) as store:
        service = Service("bench", store)
        service.add_projection(Balances())
        settle()
        started = perf_counter()
        async with service.running():
            if not await service.wait_for(head, group=Balances.name, timeout=600):
                raise TimeoutError(f"tidings' projection did not reach {head}")
            elapsed = perf_counter() - started
        [(rows, total)] = await store.query("SELECT count(*), coalesce(sum(balance), 0) FROM balances")
        return elapsed, (int(rows), int(total))


def projection_catchup(ctx: Context) -> list[Comparison]:
    n = ctx.sizes.projection_events
    accounts = n // _ACCOUNT_EVENTS
    expected = _expected_totals(accounts)
    # The peer commits every event with fsync; over the whole log it would take minutes per
    # repetition, so its per-event runner catches up over a prefix of the same log (its rate is
    # steady: the cost is one commit per event whatever the position).
    per_event = min(n, ctx.sizes.projection_peer_events)
    prefix_expected = _expected_totals(per_event // _ACCOUNT_EVENTS)
    ours: list[float] = []
    theirs: list[float] = []
    batched: list[float] = []
    with (
        ctx.workspace.fresh_db("proj-tidings-base") as tidings_base,
        ctx.workspace.fresh_db("proj-peer-base") as peer_base,
    ):
        log(f"  writing {n:,} events ({accounts:,} accounts) per library")
        tidings_head = asyncio.run(_tidings_fill(tidings_base, accounts))
        peer_head = _peer_fill(peer_base, accounts)
        assert tidings_head == peer_head == n, (tidings_head, peer_head, n)
        for _ in range(ctx.sizes.repeats):
            with ctx.workspace.fresh_db("proj-tidings") as path:
                _checkpointed_copy(tidings_base, path)
                elapsed, totals = asyncio.run(_tidings_catchup(path, n))
                assert totals == expected, (totals, expected)
                ours.append(n / elapsed)
            with ctx.workspace.fresh_db("proj-peer") as path:
                _checkpointed_copy(peer_base, path)
                elapsed, totals = peer_processing.run_projection(str(path), per_event)
                # The runner may apply a few events past the target before it stops.
                assert totals >= prefix_expected, (totals, prefix_expected)
                theirs.append(per_event / elapsed)
            with ctx.workspace.fresh_db("proj-peer-batched") as path:
                _checkpointed_copy(peer_base, path)
                elapsed, totals = peer_processing.run_batched_view(str(path), n)
                assert totals == expected, (totals, expected)
                batched.append(n / elapsed)
    title = (
        f"projection catch-up: {n:,} events ({accounts:,} accounts) into a SQLite read model, "
        "upsert per event, checkpoint committed with the rows"
    )
    return [
        compare(
            "projection_catchup",
            title,
            "events/s",
            ours,
            f"{PEER} ProjectionRunner",
            theirs,
            Aim(">=", 3.0),
            note="eventsourcing's Projection API commits each event with its tracking record (one "
            f"transaction per event), measured over the first {per_event:,} events of the same log; "
            "tidings commits a batch of 500 with its checkpoint",
        ),
        compare(
            "projection_catchup",
            title,
            "events/s",
            ours,
            f"{PEER} view, hand-batched",
            batched,
            None,
            note="the same eventsourcing view and SQL driven by hand, one transaction per page of 500 "
            "notifications (outside the Projection API): what batching alone is worth",
        ),
        compare(
            "projection_catchup",
            title,
            "events/s",
            ours,
            "aim: 100,000 events/s",
            [100_000.0],
            Aim(">=", 1.0),
        ),
    ]


# -- live delivery latency ----------------------------------------------------------------------------


async def _tidings_latencies(path: Path, warmup: int, count: int) -> list[float]:
    async with open_tidings(path) as store:
        service = Service("latency", store)
        seen: list[float] = []
        arrived = asyncio.Event()

        @service.handles(Deposited)
        async def on_deposit(event: Deposited) -> None:
            seen.append(perf_counter())
            arrived.set()

        group = "latency.on_deposit"
        latencies: list[float] = []
        async with service.running():
            for i in range(warmup + count):
                arrived.clear()
                before = len(seen)
                started = perf_counter()
                result = await store.append("latency-1", [Deposited(amount=i, reference=f"ref-{i:08d}")])
                await asyncio.wait_for(arrived.wait(), 10)
                if i >= warmup:
                    latencies.append(seen[before] - started)
                # Let the handler's checkpoint commit before the next append: a quiet start each time.
                if not await store.wait_for(result.position, group=group, timeout=10):
                    raise TimeoutError("tidings' handler did not commit its checkpoint within 10 s")
        return latencies


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def live_latency(ctx: Context) -> list[Comparison]:
    warmup, count = ctx.sizes.latency_warmup, ctx.sizes.latency_appends
    passes = min(3, ctx.sizes.repeats)
    ours: dict[str, list[float]] = {"p50": [], "p99": []}
    theirs: dict[str, list[float]] = {"p50": [], "p99": []}
    for _ in range(passes):
        with ctx.workspace.fresh_db("latency-tidings") as path:
            samples = asyncio.run(_tidings_latencies(path, warmup, count))
        ours["p50"].append(1000 * statistics.median(samples))
        ours["p99"].append(1000 * _percentile(samples, 0.99))
        with (
            ctx.workspace.fresh_db("latency-peer-source") as source,
            ctx.workspace.fresh_db("latency-peer-follower") as follower,
        ):
            samples = peer_processing.follower_latencies(str(source), str(follower), warmup, count)
        theirs["p50"].append(1000 * statistics.median(samples))
        theirs["p99"].append(1000 * _percentile(samples, 0.99))
    title = (
        f"live delivery: append -> handler latency, {count:,} sequential one-event appends after "
        f"{warmup} warm-up, one process ({passes} passes)"
    )
    reference = f"{PEER} MultiThreadedRunner follower"
    return [
        compare("live_latency", title, "ms p50", ours["p50"], reference, theirs["p50"], None),
        compare(
            "live_latency",
            title,
            "ms p99",
            ours["p99"],
            reference,
            theirs["p99"],
            None,
            note="eventsourcing's leader prompts the follower's thread after its commit; the follower "
            "selects the new notifications, runs its policy, then commits its tracking record (in its "
            "own database file, as eventsourcing gives each application its own)",
        ),
        compare("live_latency", title, "ms p99", ours["p99"], "aim: 5 ms", [5.0], Aim("<=", 1.0)),
    ]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("projection_catchup", "projection catch-up into a SQLite read model", projection_catchup),
        Scenario("live_latency", "live append -> handler latency", live_latency),
    )
}
