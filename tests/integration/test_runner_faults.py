"""Runners that must never stop silently, resets that always take effect, errors that say whether
to retry, and the service's life cycle: on memory and SQLite (PostgreSQL reuses them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tidings import (
    Event,
    EventStore,
    HandlerContext,
    RetryPolicy,
    Service,
    StoreUnavailable,
    SubscriptionConfig,
    TidingsError,
    UnsupportedOperation,
    open_store,
)
from tidings.processing import Projection, ProjectionTx

FAST = SubscriptionConfig(
    batch_size=100,
    poll_interval=0.05,
    retry=RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.01),
    outage_backoff=0.001,
    max_outage_backoff=0.01,
    failure_backoff=0.01,
)


class Ping(Event):
    __event_type__ = "tests.runner.Ping"
    n: int


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[EventStore]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/r.db"
    async with open_store(url) as store:
        yield store


async def pings(store: EventStore, n: int, start: int = 0) -> int:
    head = 0
    for i in range(start, start + n):
        head = (await store.append(f"p-{i}", [Ping(n=i)])).position
    return head


async def test_a_handler_that_lets_cancelled_error_escape_does_not_stop_its_group(store: EventStore) -> None:
    service = Service("svc", store, config=FAST)
    seen: list[int] = []

    @service.handles(Ping)
    async def handle(event: Ping) -> None:
        if event.n == 1:
            raise asyncio.CancelledError  # e.g. it awaited a future that someone cancelled
        seen.append(event.n)

    head = await pings(store, 3)
    async with service.running():
        assert await service.wait_for(head)
        [stats] = service.statistics()
        assert stats.state == "live" and stats.dead_lettered == 1
    assert seen == [0, 2]
    [dead] = await store.dead_letters()
    assert "CancelledError" in dead.error and dead.attempts == FAST.retry.max_attempts


async def test_a_transient_error_spends_no_attempts(store: EventStore) -> None:
    """A handler that meets an outage (StoreUnavailable) more often than its retry budget is
    waited out, not dead-lettered; a plain failure is retried then parked."""
    service = Service("svc", store, config=FAST)
    outages = 0

    @service.handles(Ping)
    async def handle(event: Ping) -> None:
        nonlocal outages
        if event.n == 0 and outages < 10:
            outages += 1
            raise StoreUnavailable("the database is locked")
        if event.n == 1:
            raise ValueError("a bug")

    head = await pings(store, 2)
    async with service.running():
        assert await service.wait_for(head)
        [stats] = service.statistics()
    assert outages == 10
    [dead] = await store.dead_letters()
    assert dead.position == 2 and dead.attempts == FAST.retry.max_attempts
    assert stats.handled == 1 and stats.dead_lettered == 1


async def test_a_reset_takes_effect_on_an_idle_group_without_a_new_append(store: EventStore) -> None:
    service = Service("svc", store, config=FAST)
    seen: list[int] = []
    replayed = asyncio.Event()

    @service.handles(Ping)
    async def handle(event: Ping) -> None:
        seen.append(event.n)
        if len(seen) == 8:
            replayed.set()

    head = await pings(store, 5)
    async with service.running():
        assert await service.wait_for(head)
        await store.set_checkpoint("svc.handle", 2)
        # No append follows: the idle runner must notice the reset by itself and replay 3..5.
        await asyncio.wait_for(replayed.wait(), 10)
        assert await service.wait_for(head)
        assert seen == [0, 1, 2, 3, 4, 2, 3, 4]


async def test_a_reset_on_a_busy_group_is_never_lost(store: EventStore) -> None:
    """Resets while the group commits batch after batch: each one takes effect."""
    config = SubscriptionConfig(batch_size=5, poll_interval=0.05, retry=FAST.retry)
    service = Service("svc", store, config=config)
    seen: list[int] = []
    reset_done = asyncio.Event()

    @service.handles(Ping)
    async def handle(event: Ping) -> None:
        seen.append(event.n)
        if event.n == 150 and not reset_done.is_set():
            # While the runner holds a batch in hand, somebody rewinds the group to 0.
            await store.set_checkpoint("svc.handle", 0)
            reset_done.set()

    head = await pings(store, 200)
    async with service.running():
        assert await service.wait_for(head, timeout=30)
        await asyncio.wait_for(reset_done.wait(), 10)
        assert await service.wait_for(head, timeout=30)
    # The batch in hand was refused at its commit; then everything was handled again from 0.
    assert seen[-200:] == list(range(200))
    assert seen.count(0) == 2 and seen.count(150) == 2 and seen.count(199) == 1


async def test_service_lifecycle_hooks_context_manager_and_no_invented_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    events: list[str] = []
    service = Service("life", f"sqlite:///{tmp_path}/life.db", config=FAST)

    @service.on_start
    async def started() -> None:
        events.append("start")

    @service.on_stop
    async def stopped() -> None:
        events.append("stop")

    async with service:
        assert service.store.is_open
        async with service.running():
            assert events == ["start"]
    assert events == ["start", "stop"]
    with pytest.raises(TidingsError, match="has no open store"):
        _ = service.store
    orphan = Service("orphan")
    with pytest.raises(TidingsError, match="has no store"):
        await orphan.publish("s", [Ping(n=1)])
    with pytest.raises(TidingsError, match="has no store"):
        await orphan.run()
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["life.db"]  # noqa: ASYNC240


class Counts(Projection):
    name = "counts"
    tables = {"counts": "CREATE TABLE {counts} (n INTEGER)"}

    def ping(self, event: Ping, tx: ProjectionTx) -> None:
        tx.execute("INSERT INTO {counts} VALUES (?)", (event.n,))


async def test_projections_on_a_store_without_sql_are_refused_at_start() -> None:
    service = Service("nosql", "memory://", config=FAST)
    service.add_projection(Counts())
    with pytest.raises(UnsupportedOperation, match="projections and sagas need a SQL database"):
        async with service.running():
            pass


async def test_execute_on_memory_fails_at_the_call_and_is_parked_at_once() -> None:
    service = Service("nosql", "memory://", config=FAST)
    runs = 0

    @service.handles(Ping)
    async def handle(event: Ping, ctx: HandlerContext) -> None:
        nonlocal runs
        runs += 1
        ctx.execute("INSERT INTO t VALUES (1)")

    async with service:
        head = await pings(service.store, 1)
        async with service.running():
            assert await service.wait_for(head)
        [dead] = await service.store.dead_letters()
    assert runs == 1 and dead.attempts == 1 and "UnsupportedOperation" in dead.error
