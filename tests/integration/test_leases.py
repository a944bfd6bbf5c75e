"""Group leases, truthful group status, projection fingerprints and the bounded inbox, on every backend
where they apply (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import wait_until
from tidings import (
    Event,
    EventStore,
    GroupStatus,
    InvalidArgument,
    Projection,
    ProjectionTx,
    RetryPolicy,
    Service,
    SubscriptionConfig,
    group_status,
    open_store,
    rebuild_projection,
)
from tidings.cli.main import app
from tidings.processing import HandlerSubscription, Lease, projection_status, read_leases
from tidings.processing.handlers import Dispatch
from tidings.store.tracking import Tx

FAST = SubscriptionConfig(
    batch_size=100,
    poll_interval=0.02,
    lease_ttl=0.3,
    failure_backoff=0.05,
    retry=RetryPolicy(max_attempts=2, initial_delay=0.001, max_delay=0.01),
)


class Tick(Event):
    __event_type__ = "tests.leases.Tick"
    n: int


async def ticks(store: EventStore, n: int, start: int = 0) -> int:
    return (await store.append(f"t-{start}", [Tick(n=i) for i in range(start, start + n)])).position


async def status_of(store: EventStore, group: str) -> GroupStatus | None:
    return next((g for g in await group_status(store) if g.group == group), None)


def test_lease_ttl_is_validated() -> None:
    assert SubscriptionConfig(lease_ttl=0.5).lease_ttl == 0.5
    for bad in (0, 0.01, -1, 7200, True, "5"):
        with pytest.raises(InvalidArgument, match="lease_ttl"):
            SubscriptionConfig(lease_ttl=bad)  # type: ignore[arg-type]


async def test_one_holder_at_a_time_takeover_after_expiry_and_release(store: EventStore) -> None:
    first, second = Lease(store, "g", 0.3), Lease(store, "g", 0.3)
    assert await first.acquire() and first.held
    assert not await second.acquire() and not second.held
    assert await first.acquire()  # ours: taken again
    assert await first.renew("live", "an error")
    [record] = (await read_leases(store)).values()
    assert record.holder == first.holder and record.alive and record.state == "live"
    assert record.holder.pid == os.getpid() and record.last_error == "an error"
    assert record.acquired_at <= record.heartbeat_at < record.expires_at

    # The holder stops renewing: its lease lapses for itself first, then in the database.
    await wait_until(lambda: not first.held, 20, "the lease to lapse for its holder")
    await wait_until(second.acquire, 20, "a standby to take the expired lease")
    assert not await first.renew("live") and not first.held  # taken over: never renewed again
    assert (await second.current()) is not None
    await second.release()
    record = (await read_leases(store))["g"]
    assert not record.alive and record.state == "stopped" and record.holder == second.holder
    assert await first.acquire()  # released: free at once, no wait for the expiry


async def test_a_failing_holder_gives_way_to_a_runner_that_can_work(store: EventStore) -> None:
    # Another process holds the group but reports that it cannot work (e.g. its projection code
    # does not match the active generation).
    failing = Lease(store, "lease.f", 60)
    assert await failing.acquire() and await failing.renew("failed", "cannot work")
    other_failing = Lease(store, "lease.f", 60)
    assert not await other_failing.acquire()  # failing runners do not take it from each other
    assert not await other_failing.acquire(preempt_failed=False)

    handled: list[int] = []

    async def handle(event: Tick) -> None:
        handled.append(event.n)

    head = await ticks(store, 5)
    runner = HandlerSubscription(store, "lease.f", Dispatch({Tick: handle}), config=FAST)
    task = asyncio.create_task(runner.run())
    try:
        assert await store.wait_for(head, group="lease.f", timeout=20)
        assert handled == list(range(5))
        assert not await failing.renew("failed", "cannot work") and not failing.held
        record = (await read_leases(store))["lease.f"]
        assert record.holder.pid == os.getpid() and record.state != "failed"
        assert record.holder.instance not in (failing.holder.instance, other_failing.holder.instance)
    finally:
        runner.stop()
        await asyncio.wait_for(task, 20)


@pytest.mark.needs("sql")  # steals the lease by writing its row with SQL
async def test_a_runner_that_loses_its_lease_stops_before_its_next_handler_and_stands_by(
    store: EventStore,
) -> None:
    handled: list[int] = []
    entered, gate = asyncio.Event(), asyncio.Event()

    async def handle(event: Tick) -> None:
        if event.n == 5 and not gate.is_set():
            entered.set()
            await gate.wait()
        handled.append(event.n)

    head = await ticks(store, 20)
    runner = HandlerSubscription(store, "lease.g", Dispatch({Tick: handle}), config=FAST)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(entered.wait(), 20)
        # Another process takes the lease over (as if this runner's heartbeats had stopped).
        thief = str(uuid.uuid4())

        def steal(tx: Tx) -> None:
            tx.execute(
                "UPDATE tidings_leases SET holder = ?, pid = 1, expires_at = expires_at + 3600 "
                "WHERE name = ?",
                (thief, "lease.g"),
            )

        await store.transaction(steal)
        await wait_until(lambda: runner.stopping, 20, "the runner to notice the lost lease")
        gate.set()  # the handler in flight finishes ...
        await wait_until(lambda: runner.state == "standby", 20, "the runner to stand by")
        assert handled == [0, 1, 2, 3, 4, 5]  # ... and no other handler was called
        # What ran was committed (nobody else committed meanwhile).
        assert await store.load_checkpoint("lease.g") == head - 14
        status = await status_of(store, "lease.g")
        assert status is not None and status.pid == 1 and status.state == "catching up"

        # The other holder goes away (its lease expires): the runner takes over and finishes.
        await store.transaction(
            lambda tx: tx.execute("UPDATE tidings_leases SET expires_at = 0 WHERE name = ?", ("lease.g",))
        )
        assert await store.wait_for(head, group="lease.g", timeout=20)
        assert handled == list(range(20))  # every event once
    finally:
        runner.stop()
        await asyncio.wait_for(task, 20)


async def test_group_status_tells_the_truth(store: EventStore) -> None:
    service = Service("st", store, config=FAST)
    seen: list[int] = []

    @service.handles(Tick)
    async def count(event: Tick) -> None:
        if event.n == 3:
            raise ValueError("three")
        seen.append(event.n)

    head = await ticks(store, 10)
    assert await status_of(store, "st.count") is None  # never ran: unknown
    async with service.running():
        assert await service.wait_for(head)
        await wait_until(lambda: _state_is(store, "st.count", "live"), 20, "status live")
        status = await status_of(store, "st.count")
        assert status is not None and status.lag == 0 and status.checkpoint == head
        assert status.pid == os.getpid() and status.heartbeat_at is not None and status.holder
        assert status.dead_letters == 1
        [stats] = service.statistics()
        assert stats.handled == 9 and stats.dead_lettered == 1  # each event counted once
    status = await status_of(store, "st.count")
    assert status is not None and status.state == "stopped" and status.lag == 0
    await ticks(store, 3, start=10)
    status = await status_of(store, "st.count")
    assert status is not None and status.state == "stopped" and status.lag == 3  # not "catching up"


async def _state_is(store: EventStore, group: str, state: str) -> bool:
    status = await status_of(store, group)
    return status is not None and status.state == state


class Counts(Projection):
    name = "counts"
    tables = {"counts": "CREATE TABLE {counts} (k TEXT PRIMARY KEY, n INTEGER NOT NULL)"}

    def tick(self, event: Tick, tx: ProjectionTx) -> None:
        tx.execute("INSERT INTO {counts} VALUES ('all', 1) ON CONFLICT (k) DO UPDATE SET n = {counts}.n + 1")


class CountsV2(Counts):
    """The same projection after a deployment that changed its table."""

    tables = {"counts": "CREATE TABLE {counts} (k TEXT PRIMARY KEY, n INTEGER NOT NULL, last INTEGER)"}

    def tick(self, event: Tick, tx: ProjectionTx) -> None:
        tx.execute(
            "INSERT INTO {counts} VALUES ('all', 1, ?) ON CONFLICT (k) "
            "DO UPDATE SET n = {counts}.n + 1, last = excluded.last",
            (event.n,),
        )


def test_fingerprint_covers_tables_handled_types_and_version() -> None:
    class Bumped(Counts):
        version = 2

    class Reformatted(Counts):
        tables = {"counts": "CREATE TABLE {counts} (\n  k TEXT PRIMARY KEY,\n  n INTEGER NOT NULL\n)"}

    base = Counts().fingerprint
    assert base == Counts().fingerprint and len(base) == 16
    assert CountsV2().fingerprint != base and Bumped().fingerprint != base
    assert Reformatted().fingerprint == base  # whitespace is not a change


@pytest.mark.needs("sql")  # SQL tables: the inbox, projections, lease rows
async def test_a_changed_projection_is_refused_until_rebuilt(store: EventStore) -> None:
    store = store
    head = await ticks(store, 5)
    old = Service("p", store, config=FAST)
    old.add_projection(Counts())
    async with old.running():
        assert await old.wait_for(head)
    [status] = await projection_status(store)
    assert status.fingerprint == Counts().fingerprint and not status.needs_rebuild

    # The new code is deployed: its table differs from generation 1's.
    new = Service("p", store, config=FAST)
    new.add_projection(CountsV2())
    async with new.running():
        head = await ticks(store, 5, start=5)
        await wait_until(lambda: new.statistics()[0].state == "failed", 20, "the runner to refuse")
        [stats] = new.statistics()
        assert stats.last_error is not None and "tidings projections rebuild counts" in stats.last_error
        [status] = await projection_status(store)
        assert status.needs_rebuild and status.state == "rebuild needed"
        assert status.checkpoint == head - 5  # nothing applied to the stale generation ...
        assert await store.dead_letters() == [] and status.dead_letters == 0  # ... nor dead-lettered
        [status] = await projection_status(store, [Counts()])  # judged against given code
        assert not status.needs_rebuild
        shown = await asyncio.to_thread(
            CliRunner().invoke, app, ["projections", "status", "--store", store.url], env={"COLUMNS": "200"}
        )
        assert "rebuild needed" in shown.output and "tidings projections rebuild counts" in shown.output
        groups = await asyncio.to_thread(
            CliRunner().invoke, app, ["groups", "--store", store.url], env={"COLUMNS": "200"}
        )
        assert "failed" in groups.output and "tidings projections rebuild counts" in groups.output

        assert await rebuild_projection(store, CountsV2()) == 2
        await wait_until(lambda: new.statistics()[0].state == "live", 20, "the runner to resume")
        await wait_until(lambda: _projection_state_is(store, "live"), 20, "status to show it")
        head = await ticks(store, 1, start=10)
        assert await new.wait_for(head)
        assert await store.query("SELECT n, last FROM counts") == [(11, 10)]
        [status] = await projection_status(store)
        assert not status.needs_rebuild and status.fingerprint == CountsV2().fingerprint
        assert status.generation == 2 and status.state == "live"
    assert await store.dead_letters() == []


async def _projection_state_is(store: EventStore, state: str) -> bool:
    [status] = await projection_status(store)
    return status.state == state


@pytest.mark.needs("sql")  # SQL tables: the inbox, projections, lease rows
async def test_the_inbox_keeps_no_row_the_checkpoint_proves(store: EventStore) -> None:
    store = store
    group = "inbox.g"
    head = 0
    for start in range(0, 5000, 500):
        head = await ticks(store, 500, start=start)
    # Rows a runner wrote ahead of its checkpoint (after a refused commit), all over the log.
    rows = [(uuid.uuid4(), position) for position in range(1, 5001, 7)]

    def seed(tx: Tx) -> None:
        tx.executemany(
            "INSERT INTO tidings_inbox (group_name, event_id, position) VALUES (?, ?, ?)",
            [(group, e.bytes if tx.dialect == "sqlite" else e, p) for e, p in rows],
        )

    await store.transaction(seed)
    [(seeded,)] = await store.query("SELECT count(*) FROM tidings_inbox WHERE group_name = ?", (group,))
    assert seeded == len(rows)

    service = Service("inbox", store, config=SubscriptionConfig(batch_size=100, poll_interval=0.02))
    handled = 0

    @service.handles(Tick, group=group)
    async def count(event: Tick) -> None:
        nonlocal handled
        handled += 1

    async def inbox_at_or_below_checkpoint() -> int:
        [(n,)] = await store.query(
            "SELECT count(*) FROM tidings_inbox WHERE group_name = ? AND position <= ?",
            (group, await store.load_checkpoint(group)),
        )
        return int(n)

    async with service.running():
        assert await service.wait_for(head, timeout=60)
        await wait_until(lambda: _is_zero(inbox_at_or_below_checkpoint()), 20, "the inbox to be pruned")
    assert handled == 5000 and await store.load_checkpoint(group) == head
    assert await store.query("SELECT count(*) FROM tidings_inbox WHERE group_name = ?", (group,)) == [(0,)]


async def _is_zero(count: object) -> bool:
    assert asyncio.iscoroutine(count)
    return await count == 0


def test_groups_and_projection_status_commands_render_holder_heartbeat_and_state(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    runner = CliRunner()

    async def scenario() -> tuple[list[dict[str, object]], str, str, list[dict[str, object]]]:
        async with open_store(url) as store:
            head = await ticks(store, 3)
            service = Service("cli", store, config=FAST)
            service.add_projection(Counts())

            @service.handles(Tick)
            async def count(event: Tick) -> None:
                pass

            async with service.running():
                assert await service.wait_for(head)
                await wait_until(lambda: _state_is(store, "cli.count", "live"), 20, "live")
                groups = await asyncio.to_thread(runner.invoke, app, ["groups", "--json", "--store", url])
                table = await asyncio.to_thread(runner.invoke, app, ["groups", "--store", url])
                projections = await asyncio.to_thread(
                    runner.invoke, app, ["projections", "status", "--store", url]
                )
            stopped = await asyncio.to_thread(runner.invoke, app, ["groups", "--json", "--store", url])
        assert groups.exit_code == 0 and stopped.exit_code == 0, (groups.output, stopped.output)
        return (
            [json.loads(line) for line in groups.output.splitlines()],
            table.output,
            projections.output,
            [json.loads(line) for line in stopped.output.splitlines()],
        )

    running, table, projections, stopped = asyncio.run(scenario())
    by_group = {g["group"]: g for g in running}
    assert set(by_group) == {"cli.count", "projection:counts:g1"}
    for g in running:
        assert g["state"] == "live" and g["pid"] == os.getpid() and g["heartbeat_at"] and g["lag"] == 0
    assert f":{os.getpid()}" in table and "live" in table and "heartbeat" in table.lower()
    assert "counts" in projections and "live" in projections and f":{os.getpid()}" in projections
    assert {g["state"] for g in stopped} == {"stopped"}
