"""A member of a consumer group in its own process, for the scale-out scenario.

``python -m benchmarks.bus_worker URL GROUP DB [--cost S]``

Joins group ``GROUP`` of service ``shipping`` over the events service ``a`` publishes, through
tidings' bus-level :meth:`NatsBus.consume` (ordered partitions, leases, ack after the handler), and
for each message waits ``--cost`` seconds (the handler's own I/O) then records the effect, once
per event id, in its own SQLite file ``DB`` (the table of :data:`benchmarks.bus_apps.EFFECTS`; WAL,
``synchronous=NORMAL``: the effect is the benchmark's counter here, and a file per member keeps the
members from queueing on one write lock -- durable effects are what ``bus_e2e`` measures).

Prints ``ready`` once it has joined. Handlers hold their first message until SIGUSR1 (so that the
benchmark can fill the stream first and time the group draining it); stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import time

from benchmarks.bus_apps import EFFECTS, OrderShipped
from tidings.bus import ConsumerGroup, DeadLetter, DeliveryPolicy, IncomingMessage
from tidings.bus.nats import NatsBus, NatsBusConfig

POLICY = DeliveryPolicy(max_deliver=20, backoff=(0.1, 0.5), ack_wait=10.0)


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(EFFECTS)
    return db


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("group")
    parser.add_argument("db")
    parser.add_argument("--cost", type=float, default=0.0)
    args = parser.parse_args()
    db = connect(args.db)
    go = asyncio.Event()

    async def handle(message: IncomingMessage) -> None:
        await go.wait()
        if args.cost:
            await asyncio.sleep(args.cost)  # the handler's own work: I/O, no CPU
        sent = message.time.timestamp() if message.time else 0.0
        db.execute(
            "INSERT OR IGNORE INTO effects VALUES (?, ?, ?, ?)",
            (str(message.event_id), message.stream_id, sent, time.time()),
        )

    async def dead_letter(letter: DeadLetter) -> None:
        raise RuntimeError(f"a dead letter in a benchmark: {letter.reason}")

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, go.set)
    async with NatsBus(NatsBusConfig.from_url(args.url)) as bus:
        group = ConsumerGroup("shipping", args.group, {"a": [OrderShipped]}, POLICY)
        await bus.consume(group, handle, dead_letter)
        print("ready", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
