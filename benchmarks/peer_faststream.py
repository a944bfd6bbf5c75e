"""The FastStream peer of the bus scenarios: a JetStream consumer in its own process.

``python -m benchmarks.peer_faststream URL STREAM SUBJECT DB``

A :class:`faststream.nats.NatsBroker` with one subscriber on ``SUBJECT`` of the JetStream stream
``STREAM`` (declared by FastStream, file storage): a durable pull consumer
(``PullSub(batch_size=100)``: FastStream fetches up to 100 messages per request and runs their
handlers concurrently), ``AckPolicy.NACK_ON_ERROR`` (acknowledged after the handler returns,
negatively acknowledged if it raises). The handler receives the CloudEvent as FastStream decodes
JSON bodies (a dict) and records the effect in the SQLite file ``DB`` -- one ``INSERT OR IGNORE``
on the event id per message, autocommit, WAL with ``synchronous=FULL``: durable and idempotent like
tidings' handler with its inbox row. Prints ``ready`` once subscribed; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sqlite3
import time
from datetime import datetime
from typing import Any

from faststream import AckPolicy
from faststream.nats import JStream, NatsBroker, PullSub

from benchmarks.bus_apps import EFFECTS

BATCH = 100


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("stream")
    parser.add_argument("subject")
    parser.add_argument("db")
    args = parser.parse_args()
    db = sqlite3.connect(args.db, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(EFFECTS)

    broker = NatsBroker(args.url)

    @broker.subscriber(
        args.subject,
        stream=JStream(name=args.stream, subjects=[args.subject]),
        durable="bench",
        pull_sub=PullSub(batch_size=BATCH),
        ack_policy=AckPolicy.NACK_ON_ERROR,
    )
    async def handle(body: dict[str, Any]) -> None:
        sent = datetime.fromisoformat(body["time"]).timestamp()
        db.execute(
            "INSERT OR IGNORE INTO effects VALUES (?, ?, ?, ?)",
            (body["id"], body["subject"], sent, time.time()),
        )

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await broker.start()
    try:
        print("ready", flush=True)
        await stop.wait()
    finally:
        await broker.stop()


if __name__ == "__main__":
    asyncio.run(main())
