"""The bus (issue 8): services in separate processes over NATS JetStream, against raw nats-py and
FastStream, on one throwaway ``nats-server`` (:mod:`benchmarks.nats_server`: JetStream,
``sync_interval: always``). Every repetition uses fresh SQLite files and its own streams.

``bus_e2e``
    Throughput end to end through the framework: N :class:`~benchmarks.bus_apps.OrderShipped`
    integration events appended in bulk (100 streams, concurrent appends) to service a's SQLite store
    -> a's outbox relay (``Service("a", store, bus=...)`` with ``a.publishes``, in this process) ->
    JetStream -> service b in another process (``tidings run benchmarks.bus_apps:b``) whose handler
    records its effect with ``ctx.execute`` in b's SQLite store, with b's inbox row. Timed from the
    first append until the last effect's handler time (read from b's store). Beside it:

    * FastStream's NATS broker (:mod:`benchmarks.peer_faststream`): the same CloudEvent payloads
      published through its JetStream publisher (with ack, 100 in flight) and consumed in another
      process by its durable pull subscriber with acks, the handler writing the same effect row in
      SQLite (WAL, ``synchronous=FULL``), timed the same way;
    * raw nats-py (the limit): JetStream publish with ack (100 in flight) of the same payloads, then a
      durable pull consumer fetching 100 at a time with an ack per message, in this process, no effect.

``bus_latency``
    Paced: one event appended every 5 ms; latency is the handler's time in b minus the event's
    timestamp in a's store (carried as the CloudEvent ``time``), p50 and p99. FastStream beside it,
    one publish every 5 ms, from the payload's ``time`` (set just before publishing) to its handler.

``bus_scaleout``
    A consumer group whose handler costs ~1 ms (``await asyncio.sleep(0.001)``: I/O, no CPU) then
    records its effect, with 1, 2 and 4 member processes (:mod:`benchmarks.bus_worker`, tidings'
    bus-level ``consume``: 16 partitions, one batch in flight per partition (what it holds, up to
    100, handled in order and acked after), partitions dealt over
    the members by leases). Once the leases are dealt, N events are published with
    ``NatsBus.publish`` while the members hold their first messages; timed from releasing them
    until the last effect (the group draining a backlog: JetStream's publish rate with
    ``sync_interval: always``, ~2,400/s here, would otherwise cap every member count alike).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Final

import nats
from faststream.nats import NatsBroker
from nats.js.errors import NotFoundError

from benchmarks.bus_apps import OrderShipped, publisher, shipped
from benchmarks.harness import Aim, Comparison, compare, log, sqlite_url
from benchmarks.scenarios_sqlite import Context, Scenario
from tidings import NO_STREAM, EventStore, RecordedEvent, open_store
from tidings.bus import ConsumerGroup, DeliveryPolicy
from tidings.bus.cloudevents import encode
from tidings.bus.nats import NatsBus, NatsBusConfig

ROOT: Final = Path(__file__).resolve().parents[1]
FASTSTREAM: Final = f"FastStream {version('faststream')} (NATS JetStream)"
RAW: Final = f"raw nats-py {version('nats-py')} JetStream"
STREAMS: Final = 100
WARMUP: Final = 50
IN_FLIGHT: Final = 100
PACE: Final = 0.005
SCALE_PARTITIONS: Final = 16
HANDLER_COST: Final = 0.001


# -- helpers --------------------------------------------------------------------------------------------


def fresh_prefix(label: str) -> str:
    return f"{label}{uuid.uuid4().hex[:8]}"


def effects(db: Path) -> list[tuple[str, float, float]]:
    """(stream id, sent, at) of every effect recorded in ``db`` so far."""
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            return list(conn.execute("SELECT stream_id, sent, at FROM effects"))
        except sqlite3.OperationalError:
            return []


def count_effects(db: Path) -> int:
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM effects").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


async def wait_effects(db: Path | list[Path], count: int, timeout: float = 300.0) -> None:
    """Wait until the file(s) hold ``count`` effects (the consumers are other processes: poll)."""
    files = db if isinstance(db, list) else [db]
    deadline = time.monotonic() + timeout
    while (done := sum(count_effects(path) for path in files)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {count} effects after {timeout:.0f} s")
        await asyncio.sleep(0.02)


def last_effect(db: Path) -> float:
    return max(at for _, _, at in effects(db))


@contextlib.asynccontextmanager
async def process(
    *args: str, ready: bytes, stderr: bool = False
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run ``python -m ARGS`` from the repository root until the block ends (SIGTERM, then wait).

    Entering waits for a line containing ``ready`` on stdout (or stderr).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        *args,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        stdout=asyncio.subprocess.PIPE if not stderr else asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE if stderr else None,
    )
    stream = proc.stderr if stderr else proc.stdout
    assert stream is not None
    drain: asyncio.Task[None] | None = None
    try:
        while True:
            line = await asyncio.wait_for(stream.readline(), 60)
            if not line:
                raise RuntimeError(f"{' '.join(args[:2])} exited before it was ready ({await proc.wait()})")
            if ready in line:
                break
        # Keep draining the pipe so that the child never blocks on a full one.
        drain = asyncio.create_task(_drain(stream))
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if drain is not None:
            drain.cancel()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def payloads(n: int, *, stream: str = "order-") -> list[bytes]:
    """The CloudEvents a's relay publishes for ``n`` events, encoded once, outside any timing."""
    now = datetime.now(UTC)
    return [encode(envelope(i, now, stream), "a") for i in range(n)]


def envelope(i: int, timestamp: datetime, stream: str = "order-") -> RecordedEvent:
    """The i-th event of a workload over :data:`STREAMS` streams named ``stream`` + a number."""
    return RecordedEvent(
        uuid.uuid4(), OrderShipped.__event_type__, f"{stream}{i % STREAMS}", 1 + i // STREAMS, i + 1,
        timestamp, shipped(i), {}, OrderShipped.__event_version__,
    )  # fmt: skip


# -- tidings end to end ---------------------------------------------------------------------------------


async def _append_bulk(store: EventStore, n: int, stream: str = "order-") -> None:
    per_stream: dict[str, list[OrderShipped]] = {}
    for i in range(n):
        per_stream.setdefault(f"{stream}{i % STREAMS}", []).append(shipped(i))
    await asyncio.gather(
        *(store.append(s, events, expected_version=NO_STREAM) for s, events in per_stream.items())
    )


@contextlib.asynccontextmanager
async def tidings_pair(ctx: Context, label: str) -> AsyncIterator[tuple[EventStore, Path]]:
    """Service a running here on a fresh store, b running in another process, both on a fresh
    prefix of the bus; yields a's store and b's database file once a warm-up event took effect."""
    bus = f"{ctx.nats.url()}?prefix={fresh_prefix('t')}"
    with ctx.workspace.fresh_db(f"{label}-a") as a_path, ctx.workspace.fresh_db(f"{label}-b") as b_path:
        async with open_store(sqlite_url(a_path)) as store:
            a = publisher(store, bus)  # type: ignore[arg-type]
            async with (
                a.running(),
                process(
                    "tidings.cli", "run", "benchmarks.bus_apps:b", "--store", sqlite_url(b_path),
                    "--bus", bus, ready=b"running", stderr=True,
                ),
            ):  # fmt: skip
                # Warm-up: the relay, b's consumers and their leases are in place, connections warm.
                await _append_bulk(store, WARMUP, "warm-")
                await wait_effects(b_path, WARMUP)
                yield store, b_path


async def tidings_throughput(ctx: Context, n: int) -> float:
    async with tidings_pair(ctx, "e2e") as (store, b_path):
        started = time.time()
        await _append_bulk(store, n)
        await wait_effects(b_path, WARMUP + n)
        return n / (last_effect(b_path) - started)


async def tidings_latency(ctx: Context, n: int) -> list[float]:
    async with tidings_pair(ctx, "lat") as (store, b_path):
        begun = time.monotonic()
        for i in range(n):
            await store.append(f"paced-{i}", [shipped(i)], expected_version=NO_STREAM)
            await asyncio.sleep(max(0.0, begun + (i + 1) * PACE - time.monotonic()))
        await wait_effects(b_path, WARMUP + n)
        return [1000 * (at - sent) for stream, sent, at in effects(b_path) if stream.startswith("paced-")]


# -- FastStream ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def faststream_pair(ctx: Context, label: str) -> AsyncIterator[tuple[NatsBroker, str, str, Path]]:
    prefix = fresh_prefix("f")
    stream, subject = f"FS_{prefix}", f"fs.{prefix}.orders"
    with ctx.workspace.fresh_db(label) as db:
        async with process(
            "benchmarks.peer_faststream", ctx.nats.url(), stream, subject, str(db), ready=b"ready"
        ):
            broker = NatsBroker(ctx.nats.url())
            await broker.start()
            try:
                await _fs_publish(broker, stream, subject, payloads(WARMUP, stream="warm-"))
                await wait_effects(db, WARMUP)
                yield broker, stream, subject, db
            finally:
                await broker.stop()


async def _fs_publish(broker: NatsBroker, stream: str, subject: str, bodies: list[bytes]) -> None:
    for i in range(0, len(bodies), IN_FLIGHT):
        await asyncio.gather(
            *(
                broker.publish(body, subject, stream=stream, headers={"Nats-Msg-Id": str(uuid.uuid4())})
                for body in bodies[i : i + IN_FLIGHT]
            )
        )


async def faststream_throughput(ctx: Context, n: int) -> float:
    bodies = payloads(n)
    async with faststream_pair(ctx, "fs-e2e") as (broker, stream, subject, db):
        started = time.time()
        await _fs_publish(broker, stream, subject, bodies)
        await wait_effects(db, WARMUP + n)
        return n / (last_effect(db) - started)


async def faststream_latency(ctx: Context, n: int) -> list[float]:
    async with faststream_pair(ctx, "fs-lat") as (broker, stream, subject, db):
        begun = time.monotonic()
        for i in range(n):
            body = encode(envelope(i, datetime.now(UTC), f"paced-{i}-"), "a")
            await broker.publish(body, subject, stream=stream, headers={"Nats-Msg-Id": str(uuid.uuid4())})
            await asyncio.sleep(max(0.0, begun + (i + 1) * PACE - time.monotonic()))
        await wait_effects(db, WARMUP + n)
        return [1000 * (at - sent) for stream, sent, at in effects(db) if stream.startswith("paced-")]


# -- raw nats-py ----------------------------------------------------------------------------------------


async def raw_throughput(ctx: Context, n: int) -> float:
    bodies = payloads(n)
    prefix = fresh_prefix("r")
    nc = await nats.connect(ctx.nats.url())
    try:
        js = nc.jetstream()
        await js.add_stream(name=f"RAW_{prefix}", subjects=[f"raw.{prefix}.>"])
        sub = await js.pull_subscribe(f"raw.{prefix}.>", durable="raw")
        started = time.perf_counter()
        for i in range(0, n, IN_FLIGHT):
            await asyncio.gather(
                *(
                    js.publish(
                        f"raw.{prefix}.{(i + k) % 8}", body, headers={"Nats-Msg-Id": str(uuid.uuid4())}
                    )
                    for k, body in enumerate(bodies[i : i + IN_FLIGHT])
                )
            )
        got = 0
        while got < n:
            for msg in await sub.fetch(IN_FLIGHT, timeout=10):
                await msg.ack()
                got += 1
        return n / (time.perf_counter() - started)
    finally:
        await nc.close()


# -- scale-out ------------------------------------------------------------------------------------------


async def scale_out(ctx: Context, n: int, members: int) -> float:
    bus_url = (
        f"{ctx.nats.url()}?prefix={fresh_prefix('s')}&partitions={SCALE_PARTITIONS}&lease_ttl=3&heartbeat=0.5"
    )
    config = NatsBusConfig.from_url(bus_url)
    group = ConsumerGroup("shipping", "g", {"a": [OrderShipped]}, DeliveryPolicy(max_deliver=20))
    batches = [
        [envelope(i, datetime.now(UTC)) for i in range(start, min(n, start + IN_FLIGHT))]
        for start in range(0, n, IN_FLIGHT)
    ]
    with ctx.workspace.fresh_db("scale") as db:
        files = [db.with_name(f"member-{m}.db") for m in range(members)]
        async with NatsBus(config) as bus:
            await bus.setup(["a"])
            async with contextlib.AsyncExitStack() as stack:
                procs = [
                    await stack.enter_async_context(
                        process(
                            "benchmarks.bus_worker", bus_url, "g", str(path), "--cost", str(HANDLER_COST),
                            ready=b"ready",
                        )
                    )
                    for path in files
                ]  # fmt: skip
                await wait_leases_dealt(bus, config, group, members)
                # The stream is filled first (its publish rate is not what is measured), while
                # each member holds the first message of its partitions; then they all go.
                for batch in batches:
                    await bus.publish("a", batch)
                started = time.time()
                for proc in procs:
                    proc.send_signal(signal.SIGUSR1)
                await wait_effects(files, n)
                return n / (max(last_effect(path) for path in files) - started)


async def wait_leases_dealt(bus: NatsBus, config: NatsBusConfig, group: ConsumerGroup, members: int) -> None:
    """Wait until every partition is held, at most ``partitions / members`` by each member (the deal
    is not what is timed)."""
    share = -(-config.partitions // members)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        holders: dict[bytes, int] = {}
        for p in range(config.partitions):
            try:
                msg = await bus.js.get_last_msg(config.lease_stream, config.lease_subject(group, "a", p))
            except NotFoundError:
                break
            holders[msg.data or b""] = holders.get(msg.data or b"", 0) + 1
        else:
            if len(holders) == members and max(holders.values()) <= share:
                return
        await asyncio.sleep(0.1)  # leases move with the members' heartbeats: nothing to wait on
    raise RuntimeError(f"the leases were not dealt over {members} members within 60 s")


# -- the scenarios --------------------------------------------------------------------------------------

_NOTE_E2E: Final = (
    "each side publishes with a broker ack (100 in flight for FastStream; the relay's batches for "
    "tidings) and its consumer, in another process, commits every effect durably in SQLite "
    "(tidings: effects + inbox rows in b's store, one transaction per batch; FastStream: an "
    "idempotent INSERT on the event id per event, WAL + synchronous=FULL, from its handler); "
    "FastStream's pull subscriber fetches 100 and runs "
    "their handlers concurrently with no order, tidings keeps per-aggregate order (8 partitions, "
    "one batch in flight each: what the partition holds, up to 100, handled in order, committed in "
    "one transaction and acked after the commit)"
)


def bus_e2e(ctx: Context) -> list[Comparison]:
    n = ctx.sizes.bus_events
    ours: list[float] = []
    peer: list[float] = []
    raw: list[float] = []
    for _ in range(ctx.sizes.bus_repeats):
        ours.append(asyncio.run(tidings_throughput(ctx, n)))
        peer.append(asyncio.run(faststream_throughput(ctx, n)))
        raw.append(asyncio.run(raw_throughput(ctx, n)))
    log(f"  tidings {ours}, FastStream {peer}, raw {raw}")
    title = (
        f"bus end to end: {n:,} integration events appended in bulk to a's SQLite store -> outbox "
        "relay -> NATS JetStream -> b's handler in another process, effect committed in b's store"
    )
    return [
        compare("bus_e2e", title, "events/s", ours, FASTSTREAM, peer, Aim(">=", 1.0), note=_NOTE_E2E),
        compare(
            "bus_e2e",
            title,
            "events/s",
            ours,
            RAW,
            raw,
            Aim(">=", 0.5),
            note="JetStream publish with ack (100 in flight) of the same CloudEvent payloads, then a "
            "durable pull consumer fetching 100 with an ack per message, one process, no effect: the limit",
        ),
    ]


def bus_latency(ctx: Context) -> list[Comparison]:
    n = ctx.sizes.bus_latency_events
    ours: list[list[float]] = []
    peer: list[list[float]] = []
    for _ in range(ctx.sizes.bus_repeats):
        ours.append(asyncio.run(tidings_latency(ctx, n)))
        peer.append(asyncio.run(faststream_latency(ctx, n)))
    title = (
        f"bus latency: {n:,} events paced one per {PACE * 1000:g} ms, a's append -> b's handler in "
        "another process (per pass p50/p99, median of the passes)"
    )
    note = (
        "from the event's timestamp in a's store (FastStream: the payload's time, set just before "
        "publishing) to the handler's clock reading, just before its effect commits"
    )
    return [
        compare(
            "bus_latency", title, "ms p50", [statistics.median(s) for s in ours], FASTSTREAM,
            [statistics.median(s) for s in peer], None, note=note,
        ),
        compare(
            "bus_latency", title, "ms p99", [percentile(s, 0.99) for s in ours], FASTSTREAM,
            [percentile(s, 0.99) for s in peer], None,
        ),
    ]  # fmt: skip


def bus_scaleout(ctx: Context) -> list[Comparison]:
    n = ctx.sizes.bus_scale_events
    samples: dict[int, list[float]] = {1: [], 2: [], 4: []}
    for _ in range(ctx.sizes.bus_repeats):
        for members in samples:
            samples[members].append(asyncio.run(scale_out(ctx, n, members)))
    log(f"  scale-out {samples}")
    title = (
        f"bus scale-out: {n:,} events, a group whose handler costs ~{HANDLER_COST * 1000:g} ms (I/O), "
        f"{SCALE_PARTITIONS} partitions, 1, 2 and 4 member processes"
    )
    reference = "the same group, 1 process"
    return [
        compare(
            "bus_scaleout", title, "events/s, 2 processes", samples[2], reference, samples[1], Aim(">=", 1.8),
            note="the stream is filled first, then the members (started and holding their leases "
            "before) drain it; each records its effects in its own SQLite file (WAL, synchronous=NORMAL); "
            "near linear = 80% or more of N times one process",
        ),
        compare(
            "bus_scaleout", title, "events/s, 4 processes", samples[4], reference, samples[1], Aim(">=", 3.2)
        ),
    ]  # fmt: skip


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("bus_e2e", "bus end to end, against FastStream and raw nats-py", bus_e2e),
        Scenario("bus_latency", "bus end-to-end latency, against FastStream", bus_latency),
        Scenario("bus_scaleout", "bus consumer group scale-out, 1/2/4 processes", bus_scaleout),
    )
}
"""The bus scenarios, in the order ``make bench`` runs them."""
