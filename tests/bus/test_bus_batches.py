"""Batches on the bus: a partition's backlog is taken and handled as one batch, committed in one
transaction with its inbox rows, and acknowledged after the commit -- with every guarantee of the
one-at-a-time path: a poison message is parked alone, order holds, and a crash between the commit
and the acknowledgement, or a server restart under a batch, applies nothing twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.bus.conftest import ServerFactory
from tests.helpers import wait_until
from tidings import Event, HandlerContext, RecordedEvent, RetryPolicy, Service, SubscriptionConfig
from tidings.bus import (
    BatchOutcome,
    Bus,
    ConsumerGroup,
    DeliveryPolicy,
    IncomingMessage,
    open_bus,
)
from tidings.bus.inbound import inbox_group
from tidings.bus.nats import NatsBus, NatsBusConfig
from tidings.errors import InvalidArgument
from tidings.integration import IntegrationEvent
from tidings.testing.bus import Recorder, envelopes

APPS = Path(__file__).with_name("apps")
FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.05, retry=RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.01)
)

pytestmark = pytest.mark.timeout(240)


class Picked(IntegrationEvent):
    __source__ = "orders"
    __event_type__ = "tests.batches.Picked"
    n: int


class Applied(Event):
    __event_type__ = "tests.batches.Applied"
    n: int


@pytest.fixture(params=["memory", "nats"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    url = "memory://" if request.param == "memory" else request.getfixturevalue("nats_url")
    async with open_bus(url) as bus:
        yield bus


async def test_a_partition_backlog_is_handed_over_as_one_batch_in_order(bus: Bus) -> None:
    """Ten messages waiting in one partition reach the batch handler together, in order."""
    await bus.publish("orders", envelopes("order-1", 10))
    batches: list[list[int]] = []
    recorder = Recorder()

    async def handle(messages: Sequence[IncomingMessage]) -> BatchOutcome:
        batches.append([m.stream_version or 0 for m in messages])
        return BatchOutcome(len(messages))

    group = ConsumerGroup("shipping", "g", {"orders": []})
    async with await bus.consume_batches(group, handle, recorder.dead_letter):
        await wait_until(lambda: sum(len(b) for b in batches) >= 10, 30, "ten messages handled")
    assert batches[0] == list(range(1, 11)), batches
    assert recorder.dead == []
    stats = await bus.statistics()
    assert stats.acked == 10 and stats.redelivered == 0


async def test_the_third_of_ten_failing_for_good_is_parked_alone(tmp_path: Path, bus: Bus) -> None:
    """One batch of ten messages of one aggregate; the third fails permanently. Only it is
    dead-lettered (at once, without retries); the other nine take effect once each, in order."""
    orders = Service("orders", f"sqlite:///{tmp_path}/o.db", bus=bus, config=FAST)
    stock = Service("stock", f"sqlite:///{tmp_path}/s.db", bus=bus, config=FAST)
    orders.publishes(Picked)
    calls: list[tuple[int, int]] = []

    @stock.handles(Picked)
    async def apply(event: Picked, ctx: HandlerContext) -> None:
        calls.append((event.n, ctx.attempt))
        if event.n == 3:
            raise InvalidArgument("item 3 does not exist")
        ctx.emit("applied", [Applied(n=event.n)])

    async with orders, stock:
        async with orders.running():
            # The whole backlog is on the bus before the consumer joins: one partition, one batch.
            await orders.publish("order-1", [Picked(n=n) for n in range(1, 11)])
            assert await orders.wait_for(await orders.store.head(), group="orders.relay")
        async with stock.running():

            async def settled() -> bool:
                applied = [e async for e in stock.store.read_all(event_types=[Applied])]
                return len(applied) == 9 and len(await stock.store.dead_letters()) == 1

            await wait_until(settled, 60, "nine applied and one parked")
            stats = {s.group: s for s in stock.statistics()}["stock.apply@bus"]
        applied = [e.event.n async for e in stock.store.read_all(event_types=[Applied])]  # type: ignore[attr-defined]
        [dead] = await stock.store.dead_letters()
    assert applied == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert dead.group == inbox_group("stock.apply") and "item 3 does not exist" in dead.error
    assert dead.attempts == 1
    # Every message ran once: the permanent failure was not retried, its neighbours not re-run.
    assert sorted(calls) == [(n, 1) for n in range(1, 11)]
    assert [n for n, _ in calls] == list(range(1, 11))
    assert stats.handled == 9 and stats.dead_lettered == 1


async def test_a_retried_message_holds_back_the_rest_of_its_batch(bus: Bus) -> None:
    """The fourth of eight fails twice, then succeeds: the three before it are acknowledged, the
    four after it wait for it, and the handler sees the partition in order throughout."""
    await bus.publish("orders", envelopes("order-1", 8))
    seen: list[tuple[int, int]] = []
    failures = defaultdict(int)
    recorder = Recorder()

    async def handle(messages: Sequence[IncomingMessage]) -> BatchOutcome:
        for index, message in enumerate(messages):
            version = message.stream_version or 0
            seen.append((version, message.attempt))
            if version == 4 and failures[version] < 2:
                failures[version] += 1
                return BatchOutcome(index, RuntimeError("not yet"))
        return BatchOutcome(len(messages))

    policy = DeliveryPolicy(max_deliver=5, backoff=(0.05,), ack_wait=10.0)
    group = ConsumerGroup("shipping", "g", {"orders": []}, policy)
    async with await bus.consume_batches(group, handle, recorder.dead_letter):
        await wait_until(lambda: any(v == 8 for v, _ in seen), 30, "the last message handled")
    assert [v for v, _ in seen] == [1, 2, 3, 4, 4, 4, 5, 6, 7, 8]
    assert [a for v, a in seen if v == 4] == [1, 2, 3]
    assert recorder.dead == []


# -- faults, on NATS --------------------------------------------------------------------------------


def _effects(db: Path) -> list[tuple[str, str, int]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return list(conn.execute("SELECT event_id, stream_id, version FROM effects ORDER BY rowid"))
        except sqlite3.OperationalError:
            return []


async def _tidings_run(app: str, store: str, bus: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tidings.cli", "run", app, "--store", store, "--bus", bus,
        env={**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(APPS), *sys.path])},
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    while True:  # the banner: the service is running
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        if not line:
            break  # it died already (the kill may come before the banner is read)
        if b"running" in line:
            break
    return proc


async def test_killed_between_commit_and_ack_applies_the_batch_once(
    tmp_path: Path, nats_servers_factory: ServerFactory
) -> None:
    """The consumer process is SIGKILLed right after a batch committed, before its acknowledgement:
    the broker redelivers the batch to the restarted process, whose inbox skips it."""
    sys.path.insert(0, str(APPS))
    from batchkill import Shipped

    server = nats_servers_factory.single()
    bus_url = f"{server.url}?prefix=k{uuid.uuid4().hex[:8]}&lease_ttl=2&heartbeat=0.5&fetch_wait=0.5"
    streams = [f"order-{i}" for i in range(3)]
    now = datetime.now(UTC)
    published = [
        RecordedEvent(uuid.uuid4(), Shipped.__event_type__, s, v, 0, now, Shipped(n=v), {}, 1)
        for s in streams
        for v in range(1, 11)
    ]
    async with NatsBus(NatsBusConfig.from_url(bus_url)) as bus:
        await bus.setup(["orders"])
        await bus.publish("orders", published)
        store = f"sqlite:///{tmp_path}/stock.db"
        marker = tmp_path / "killed"
        first = await _tidings_run("batchkill:stock", store, bus_url, {"BATCHKILL_MARKER": str(marker)})
        assert await asyncio.wait_for(first.wait(), 60) == -signal.SIGKILL
        # The fault happened where it matters: a batch committed, and it is still unacknowledged.
        batch = int(marker.read_text())
        committed = _effects(tmp_path / "stock.db")
        assert len(committed) >= batch > 1
        config = NatsBusConfig.from_url(bus_url)
        pending = [info.num_ack_pending for info in await bus.js.consumers_info(config.stream_name("orders"))]
        assert sum(pending) >= batch
        second = await _tidings_run("batchkill:stock", store, bus_url, {})
        try:
            await wait_until(
                lambda: len(_effects(tmp_path / "stock.db")) >= len(published),
                90,
                lambda: f"{len(published)} effects (have {len(_effects(tmp_path / 'stock.db'))})",
            )

            # Everything was settled in the end (the redelivered batch was acknowledged).
            async def acked() -> bool:
                infos = await bus.js.consumers_info(config.stream_name("orders"))
                return sum(i.num_ack_pending + i.num_pending for i in infos) == 0

            await wait_until(acked, 60, "every message acknowledged")
        finally:
            second.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(second.wait(), 60) == 0
    rows = _effects(tmp_path / "stock.db")
    assert sorted(r[0] for r in rows) == sorted(str(e.event_id) for e in published), "lost or applied twice"
    for s in streams:
        assert [v for _, stream, v in rows if stream == s] == list(range(1, 11)), s


async def test_a_batch_spanning_a_server_restart_applies_once_in_order(
    nats_servers_factory: ServerFactory,
) -> None:
    """The server stops while a member is inside a batch and restarts after the batch ended: its
    acknowledgements reach the server late (the client holds them through the reconnect) or not at
    all (then the batch comes back, and an inbox keyed by event id skips it). Either way every
    effect happens once, and each aggregate's order holds across the restart."""
    server = nats_servers_factory.single()
    bus_url = (
        f"{server.url}?prefix=r{uuid.uuid4().hex[:8]}&partitions=2&lease_ttl=2&heartbeat=0.5&fetch_wait=0.5"
    )
    streams = [f"order-{i}" for i in range(4)]
    per_stream = {s: envelopes(s, 15) for s in streams}
    effects: dict[str, list[int]] = defaultdict(list)
    inbox: set[uuid.UUID] = set()
    redelivered = 0
    ended_while_down = 0
    in_batch = asyncio.Event()
    release = asyncio.Event()
    recorder = Recorder()

    async def handle(messages: Sequence[IncomingMessage]) -> BatchOutcome:
        nonlocal redelivered, ended_while_down
        if len(messages) > 1 and not release.is_set():
            in_batch.set()
            await release.wait()  # the server goes down while this batch is in hand
            ended_while_down += not server.running
        for message in messages:
            redelivered += message.attempt > 1
            if message.event_id in inbox:
                continue
            inbox.add(message.event_id)
            effects[message.stream_id].append(message.stream_version or 0)
        return BatchOutcome(len(messages))

    policy = DeliveryPolicy(max_deliver=50, backoff=(0.1,), ack_wait=3.0)
    async with NatsBus(NatsBusConfig.from_url(bus_url)) as bus:
        await bus.setup(["orders"])
        await bus.publish("orders", [e for s in streams for e in per_stream[s]])
        await bus.consume_batches(
            ConsumerGroup("shipping", "g", {"orders": []}, policy), handle, recorder.dead_letter
        )
        await asyncio.wait_for(in_batch.wait(), 60)
        await asyncio.to_thread(server.stop)
        assert not server.running
        release.set()
        await asyncio.sleep(0.5)  # the batch ends and its acknowledgements fail while the server is away
        await asyncio.to_thread(server.start)
        total = sum(len(v) for v in per_stream.values())
        await wait_until(lambda: len(inbox) == total, 120, f"all {total} events handled")
    assert recorder.dead == []
    # The fault hit a batch: it was in hand when the server stopped, and ended while it was away.
    assert ended_while_down >= 1
    for s in streams:
        assert effects[s] == list(range(1, 16)), (s, effects[s])
