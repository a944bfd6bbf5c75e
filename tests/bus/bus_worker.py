"""A consumer-group instance in its own process, for the fault tests.

``python -m tests.bus.bus_worker URL GROUP DB NAME [--cost S] [--stall-at N] [--ack-wait S]``

Consumes every type the service ``orders`` publishes as a member of ``GROUP`` of service
``shipping``, and records in the SQLite file ``DB``:

* ``deliveries``: every delivery the handler saw (event id, worker, attempt, whether it was a
  duplicate of an effect already recorded);
* ``effects``: the effect, once per event id (the idempotency record: ``INSERT OR IGNORE`` on the
  primary key), in handling order (rowid), with the stream id and version for the order check.

``--stall-at N``: the N-th handled message writes a ``stalls`` row and then waits two seconds
inside the handler (other handlers of the process wait too), so that a test can SIGSTOP the
process mid-handler. Prints ``ready`` once the
member has joined the group; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import time

from tidings.bus import ConsumerGroup, DeadLetter, DeliveryPolicy, IncomingMessage
from tidings.bus.nats import NatsBus, NatsBusConfig
from tidings.testing.events import Credited

SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (event_id TEXT PRIMARY KEY, stream_id TEXT, version INTEGER,
                                    worker TEXT, at REAL);
CREATE TABLE IF NOT EXISTS deliveries (event_id TEXT, worker TEXT, attempt INTEGER, duplicate INTEGER,
                                       at REAL);
CREATE TABLE IF NOT EXISTS stalls (event_id TEXT, worker TEXT, at REAL);
CREATE TABLE IF NOT EXISTS dead (event_id TEXT, worker TEXT, reason TEXT);
"""


def connect(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    return db


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("group")
    parser.add_argument("db")
    parser.add_argument("name")
    parser.add_argument("--cost", type=float, default=0.0)
    parser.add_argument("--stall-at", type=int, default=0)
    parser.add_argument("--ack-wait", type=float, default=3.0)
    args = parser.parse_args()
    db = connect(args.db)
    handled = 0
    quiet = asyncio.Event()
    quiet.set()

    async def handle(message: IncomingMessage) -> None:
        nonlocal handled
        handled += 1
        number = handled  # other partitions' handlers count on while this one awaits
        event_id = str(message.event_id)
        if args.cost:
            await asyncio.sleep(args.cost)  # the handler's own work
        stalling = number == args.stall_at
        if stalling:
            # Hold the other partitions' handlers back, so that when the test stops this process it
            # is not in the middle of an SQLite write (a stopped process would keep the write lock
            # and block every other worker). No await lies between the gate and the writes.
            quiet.clear()
            db.execute("INSERT INTO stalls VALUES (?, ?, ?)", (event_id, args.name, time.time()))
            await asyncio.sleep(2.0)  # the window in which the test SIGSTOPs this process
        else:
            await quiet.wait()
        # The effect and its idempotency record are one statement, so they commit together.
        cursor = db.execute(
            "INSERT OR IGNORE INTO effects VALUES (?, ?, ?, ?, ?)",
            (event_id, message.stream_id, message.stream_version, args.name, time.time()),
        )
        db.execute(
            "INSERT INTO deliveries VALUES (?, ?, ?, ?, ?)",
            (event_id, args.name, message.attempt, int(cursor.rowcount == 0), time.time()),
        )
        if stalling:
            quiet.set()

    async def dead_letter(letter: DeadLetter) -> None:
        event_id = str(letter.message.event_id) if letter.message else None
        db.execute("INSERT INTO dead VALUES (?, ?, ?)", (event_id, args.name, letter.reason))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    policy = DeliveryPolicy(max_deliver=20, backoff=(0.1, 0.5), ack_wait=args.ack_wait)
    config = NatsBusConfig.from_url(args.url)
    async with NatsBus(config) as bus:
        await bus.consume(
            ConsumerGroup("shipping", args.group, {"orders": [Credited]}, policy), handle, dead_letter
        )
        print("ready", flush=True)
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
