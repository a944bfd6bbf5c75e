"""Fault tests with real processes: NATS servers stopped, restarted and killed, consumer instances
SIGKILLed and SIGSTOPped. Every test checks that nothing was lost, that each aggregate's events took
effect in version order, and that the fault really happened. Waits are on conditions, never on time.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
import pytest

from tests.bus.conftest import ServerFactory
from tests.helpers import wait_until
from tidings.bus import BusUnavailable, ConsumerGroup, DeliveryPolicy, IncomingMessage, partition_of
from tidings.bus.nats import NatsBus, NatsBusConfig
from tidings.events import RecordedEvent
from tidings.testing.bus import Recorder, envelopes

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 8
LEASE_TTL = 2
HEARTBEAT = 0.5
FETCH_WAIT = 0.5
ACK_WAIT = 3.0
OPTIONS = f"partitions={PARTITIONS}&lease_ttl={LEASE_TTL}&heartbeat={HEARTBEAT}&fetch_wait={FETCH_WAIT}"
# The documented failover bound (tidings.bus.nats): leases expire and are re-dealt, the message in
# hand is redelivered after ack_wait, the new holder's first pull returns.
FAILOVER_BOUND = max(LEASE_TTL + HEARTBEAT + 1, ACK_WAIT) + FETCH_WAIT
# What a shared 2-CPU test machine adds on top (process scheduling, SQLite, the handler's cost).
SLACK = 4.0

pytestmark = pytest.mark.timeout(300)
T = TypeVar("T")


def bus_url(server_url: str, **extra: str) -> str:
    query = "&".join([OPTIONS, f"prefix=t{uuid.uuid4().hex[:10]}", *(f"{k}={v}" for k, v in extra.items())])
    return f"{server_url}?{query}"


def rounds(streams: list[str], versions: int) -> list[list[RecordedEvent]]:
    """One batch per version: every aggregate's version 1, then every aggregate's version 2, ..."""
    per_stream = {s: envelopes(s, versions) for s in streams}
    return [[per_stream[s][v] for s in streams] for v in range(versions)]


async def answered(request: Callable[[], Awaitable[T]], timeout: float) -> T:
    """The first answer to ``request`` within ``timeout`` seconds, asking again after each timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await request()
        except nats.errors.Error:
            if time.monotonic() > deadline:
                raise


class Publisher:
    """Publishes batches in the background, retrying each while the broker is unavailable."""

    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus
        self.unavailable = 0
        self.batches_done = 0

    async def run(self, batches: list[list[RecordedEvent]]) -> None:
        for batch in batches:
            while True:
                try:
                    await self.bus.publish("orders", batch)
                    break
                except BusUnavailable:
                    self.unavailable += 1
                    await asyncio.sleep(0.1)  # back-off before publishing the batch again
            self.batches_done += 1


class FirstEffects:
    """An in-process consumer's idempotency record: the first delivery of each event takes effect."""

    def __init__(self) -> None:
        self.order: dict[str, list[int]] = defaultdict(list)
        self.seen: set[uuid.UUID] = set()
        self.deliveries = 0

    async def handle(self, message: IncomingMessage) -> None:
        self.deliveries += 1
        if message.event_id in self.seen:
            return
        self.seen.add(message.event_id)
        assert message.stream_version is not None
        self.order[message.stream_id].append(message.stream_version)


def assert_in_order(order: dict[str, list[int]], streams: list[str], versions: int) -> None:
    for s in streams:
        assert order[s] == list(range(1, versions + 1)), (s, order[s])


async def run_in_thread(fn: Callable[[], None]) -> None:
    await asyncio.to_thread(fn)


# -- the NATS server stopped and restarted mid-flow ---------------------------------------------------


async def test_server_stopped_and_restarted_mid_flow(nats_servers_factory: ServerFactory) -> None:
    server = nats_servers_factory.single()
    streams = [f"order-{i}" for i in range(40)]
    batches = rounds(streams, 20)
    effects = FirstEffects()
    recorder = Recorder()
    policy = DeliveryPolicy(max_deliver=50, backoff=(0.1,), ack_wait=ACK_WAIT)
    async with NatsBus(NatsBusConfig.from_url(bus_url(server.url))) as bus:
        await bus.consume(
            ConsumerGroup("shipping", "g", {"orders": []}, policy), effects.handle, recorder.dead_letter
        )
        publisher = Publisher(bus)
        await publisher.run(batches[:10])
        await wait_until(lambda: len(effects.seen) >= 150, 60, "150 events handled")
        await run_in_thread(server.stop)
        assert not server.running and server.process is not None and server.process.returncode is not None
        publishing = asyncio.create_task(publisher.run(batches[10:]))
        await wait_until(lambda: publisher.unavailable > 0, 60, "a publish to fail while the server is down")
        await run_in_thread(server.start)
        await asyncio.wait_for(publishing, 120)
        total = len(streams) * 20
        await wait_until(lambda: len(effects.seen) == total, 120, f"all {total} events handled")
    assert recorder.dead == []
    assert_in_order(effects.order, streams, 20)


# -- a 3-node cluster with one node killed mid-flow ---------------------------------------------------


async def test_cluster_node_killed_mid_flow(nats_servers_factory: ServerFactory) -> None:
    cluster = nats_servers_factory.cluster(3)
    streams = [f"order-{i}" for i in range(30)]
    batches = rounds(streams, 20)
    effects = FirstEffects()
    recorder = Recorder()
    policy = DeliveryPolicy(max_deliver=50, backoff=(0.1,), ack_wait=ACK_WAIT)
    config = NatsBusConfig.from_url(bus_url(cluster.url, replicas="3"))
    async with NatsBus(config) as bus:
        await bus.consume(
            ConsumerGroup("shipping", "g", {"orders": []}, policy), effects.handle, recorder.dead_letter
        )
        info = await bus.js.stream_info(config.stream_name("orders"))
        assert info.config.num_replicas == 3 and info.cluster is not None
        publisher = Publisher(bus)
        publishing = asyncio.create_task(publisher.run(batches))
        await wait_until(lambda: len(effects.seen) >= 120, 60, "120 events handled")
        # Kill the stream's leader: the hardest node to lose.
        leader = next(n for n in cluster.nodes if n.name == info.cluster.leader)
        await run_in_thread(leader.kill)
        assert (
            not leader.running and leader.process is not None and leader.process.returncode == -signal.SIGKILL
        )
        await asyncio.wait_for(publishing, 120)
        total = len(streams) * 20
        await wait_until(lambda: len(effects.seen) == total, 120, f"all {total} events handled")
        # The surviving nodes may still be settling (a new meta leader): ask until one answers.
        after = await answered(lambda: bus.js.stream_info(config.stream_name("orders")), 60)
        assert after.cluster is not None and after.cluster.leader != leader.name
        assert after.state.messages == total
    assert recorder.dead == []
    assert_in_order(effects.order, streams, 20)


# -- consumer instances in their own processes -------------------------------------------------------


class Workers:
    """Consumer-group instances running tests/bus/bus_worker.py."""

    def __init__(self, url: str, db: Path, tmp: Path) -> None:
        self.url = url
        self.db = db
        self.tmp = tmp
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, *extra: str) -> asyncio.subprocess.Process:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with (self.tmp / f"{name}.err").open("wb") as stderr:
            proc = await self._spawn(name, env, stderr, extra)
        self.procs[name] = proc
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
        except TimeoutError:
            line = b""
        if line.strip() != b"ready":
            raise AssertionError(f"worker {name} did not start: {(self.tmp / f'{name}.err').read_text()}")
        return proc

    async def _spawn(
        self, name: str, env: dict[str, str], stderr: Any, extra: tuple[str, ...]
    ) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.bus.bus_worker",
            self.url,
            "g",
            str(self.db),
            name,
            *extra,
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )

    async def close(self) -> None:
        for proc in self.procs.values():
            if proc.returncode is None:
                with_signal(proc, signal.SIGCONT)
                with_signal(proc, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()


def with_signal(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        os.kill(proc.pid, sig)


def query(db: Path, sql: str, *args: object) -> list[tuple[object, ...]]:
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            return list(conn.execute(sql, args))
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise


def count(db: Path, sql: str, *args: object) -> int:
    rows = query(db, sql, *args)
    return int(rows[0][0]) if rows else 0  # type: ignore[call-overload]


def effect_order(db: Path) -> dict[str, list[int]]:
    order: dict[str, list[int]] = defaultdict(list)
    for stream_id, version in query(db, "SELECT stream_id, version FROM effects ORDER BY rowid"):
        order[str(stream_id)].append(int(version))  # type: ignore[call-overload]
    return order


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (``T`` = stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


async def with_workers(url: str, tmp_path: Path, body: Callable[[Workers, Path], Awaitable[None]]) -> None:
    db = tmp_path / "effects.db"
    workers = Workers(url, db, tmp_path)
    try:
        await body(workers, db)
    finally:
        await workers.close()


async def test_a_consumer_killed_among_three_instances(
    nats_servers_factory: ServerFactory, tmp_path: Path
) -> None:
    server = nats_servers_factory.single()
    url = bus_url(server.url)
    streams = [f"agg-{i:03d}" for i in range(100)]
    versions = 10
    total = len(streams) * versions

    async def body(workers: Workers, db: Path) -> None:
        for name in ("w1", "w2", "w3"):
            await workers.start(name, "--cost", "0.01", "--ack-wait", str(ACK_WAIT))
        async with NatsBus(NatsBusConfig.from_url(url)) as bus:
            for batch in rounds(streams, versions):
                await bus.publish("orders", batch)
        await wait_until(lambda: count(db, "SELECT count(*) FROM effects") >= total * 0.3, 120, "30% handled")
        victim = workers.procs["w1"]
        victim.kill()
        killed_at = time.time()
        assert await victim.wait() == -signal.SIGKILL
        done_by_victim = query(db, "SELECT stream_id FROM effects WHERE worker = 'w1'")
        assert done_by_victim, "w1 had handled nothing: the kill proved nothing"
        await wait_until(
            lambda: count(db, "SELECT count(*) FROM effects") == total, 120, "every event handled"
        )

        # Every event took effect once, and per aggregate in version order.
        assert count(db, "SELECT count(DISTINCT event_id) FROM effects") == total
        assert_in_order(effect_order(db), streams, versions)
        # The victim's partitions were taken over within the documented failover bound.
        victim_parts = {partition_of(str(s), PARTITIONS) for (s,) in done_by_victim}
        takeover: dict[int, float] = {}
        for stream_id, at, worker in query(
            db, "SELECT stream_id, at, worker FROM effects WHERE at > ?", killed_at
        ):
            part = partition_of(str(stream_id), PARTITIONS)
            if part in victim_parts and worker != "w1":
                takeover[part] = min(takeover.get(part, float("inf")), float(at))  # type: ignore[arg-type]
        assert takeover, "no partition of w1 had work left after the kill"
        slowest = max(takeover.values()) - killed_at
        print(
            f"partitions of the killed instance handled again after {slowest:.2f}s (bound {FAILOVER_BOUND}s)"
        )
        assert slowest <= FAILOVER_BOUND + SLACK, (slowest, FAILOVER_BOUND)

    await with_workers(url, tmp_path, body)


async def test_a_consumer_stopped_past_its_ack_wait_and_resumed(
    nats_servers_factory: ServerFactory, tmp_path: Path
) -> None:
    server = nats_servers_factory.single()
    url = bus_url(server.url)
    streams = [f"agg-{i:03d}" for i in range(20)]
    versions = 20
    total = len(streams) * versions

    async def body(workers: Workers, db: Path) -> None:
        stalled = await workers.start("a", "--cost", "0.01", "--stall-at", "30", "--ack-wait", str(ACK_WAIT))
        await workers.start("b", "--cost", "0.01", "--ack-wait", str(ACK_WAIT))
        async with NatsBus(NatsBusConfig.from_url(url)) as bus:
            for batch in rounds(streams, versions):
                await bus.publish("orders", batch)
        await wait_until(
            lambda: bool(query(db, "SELECT 1 FROM stalls")), 120, "worker a to stall mid-handler"
        )
        with_signal(stalled, signal.SIGSTOP)
        await wait_until(lambda: process_state(stalled.pid) == "T", 10, "the kernel to stop worker a")
        (event_id,) = query(db, "SELECT event_id FROM stalls")[0]
        # b gets the message a holds once a's lease and the message's ack wait have run out.
        await wait_until(
            lambda: bool(query(db, "SELECT 1 FROM effects WHERE event_id = ? AND worker = 'b'", event_id)),
            60,
            "b to handle the message a was stopped on",
        )
        assert process_state(stalled.pid) == "T"
        with_signal(stalled, signal.SIGCONT)
        await wait_until(
            lambda: count(db, "SELECT count(*) FROM effects") == total, 120, "every event handled"
        )
        # a resumed inside its handler and delivered the same message again: the record absorbed it.
        await wait_until(
            lambda: bool(query(db, "SELECT 1 FROM deliveries WHERE event_id = ? AND worker = 'a'", event_id)),
            60,
            "a to finish the handler it was stopped in",
        )
        assert query(
            db, "SELECT duplicate FROM deliveries WHERE event_id = ? AND worker = 'a'", event_id
        ) == [(1,)]
        assert count(db, "SELECT count(*) FROM effects WHERE event_id = ?", event_id) == 1
        assert count(db, "SELECT count(DISTINCT event_id) FROM effects") == total
        assert_in_order(effect_order(db), streams, versions)

    await with_workers(url, tmp_path, body)


# -- a publisher SIGKILLed repeatedly while publishing ----------------------------------------------


async def test_a_publisher_killed_repeatedly_loses_and_duplicates_nothing(
    nats_servers_factory: ServerFactory, tmp_path: Path
) -> None:
    server = nats_servers_factory.single()
    url = bus_url(server.url)
    streams, versions = 20, 30
    total = streams * versions
    db = tmp_path / "publisher.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    config = NatsBusConfig.from_url(url)
    effects = FirstEffects()
    recorder = Recorder()

    def checkpoint() -> int:
        return count(db, "SELECT position FROM checkpoint")

    async def start() -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "tests.bus.publisher_worker", url, str(db), str(streams), str(versions), "10"),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() == b"started"
        return proc

    async with NatsBus(config) as bus:
        await bus.consume(
            ConsumerGroup("shipping", "g", {"orders": []}, DeliveryPolicy(ack_wait=ACK_WAIT)),
            effects.handle,
            recorder.dead_letter,
        )
        kills = 0
        while kills < 5:
            before = checkpoint()
            proc = await start()
            await wait_until(lambda b=before: checkpoint() > b, 60, "the publisher to make progress")
            proc.kill()
            assert await proc.wait() == -signal.SIGKILL
            kills += 1
            assert checkpoint() < total, "the publisher finished before it was killed: make the run longer"
        proc = await start()
        assert await asyncio.wait_for(proc.wait(), 120) == 0
        assert checkpoint() == total
        await wait_until(lambda: len(effects.seen) == total, 120, f"all {total} events handled")
        info = await bus.js.stream_info(config.stream_name("orders"))
        # The stream holds every event exactly once: re-published batches were dropped by Nats-Msg-Id.
        assert info.state.messages == total
        assert effects.deliveries == total
    assert recorder.dead == []
    assert_in_order(effects.order, [f"agg-{s}" for s in range(streams)], versions)
