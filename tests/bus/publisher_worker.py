"""A publisher in its own process, for the fault tests: publishes a fixed, deterministic sequence of
events of service ``orders`` in batches and checkpoints its position in SQLite after each batch, as an
outbox relay does (publish, then checkpoint -- a crash between the two re-publishes the batch).

``python -m tests.bus.publisher_worker URL DB STREAMS VERSIONS BATCH``

Event ids are derived from (stream id, version), so every run publishes the very same events.
Prints ``started`` once connected; exits 0 when everything is published.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import uuid
from datetime import UTC, datetime

from tidings.bus import BusUnavailable
from tidings.bus.nats import NatsBus, NatsBusConfig
from tidings.events import RecordedEvent
from tidings.testing.events import Credited

NAMESPACE = uuid.UUID("6f1c9a4e-2b1d-4c37-9a55-0c1d2e3f4a5b")


def events(streams: int, versions: int) -> list[RecordedEvent]:
    now = datetime.now(UTC)
    return [
        RecordedEvent(
            event_id=uuid.uuid5(NAMESPACE, f"agg-{s}/{v}"),
            event_type=Credited.__event_type__,
            stream_id=f"agg-{s}",
            version=v,
            position=(v - 1) * streams + s + 1,
            timestamp=now,
            event=Credited(amount=v),
            metadata={},
        )
        for v in range(1, versions + 1)
        for s in range(streams)
    ]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("db")
    parser.add_argument("streams", type=int)
    parser.add_argument("versions", type=int)
    parser.add_argument("batch", type=int)
    args = parser.parse_args()
    db = sqlite3.connect(args.db, isolation_level=None, timeout=30)
    db.execute(
        "CREATE TABLE IF NOT EXISTS checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1), position INTEGER)"
    )
    db.execute("CREATE TABLE IF NOT EXISTS runs (published INTEGER, duplicates INTEGER)")
    db.execute("INSERT OR IGNORE INTO checkpoint VALUES (1, 0)")
    all_events = events(args.streams, args.versions)
    async with NatsBus(NatsBusConfig.from_url(args.url)) as bus:
        print("started", flush=True)
        (position,) = db.execute("SELECT position FROM checkpoint").fetchone()
        while position < len(all_events):
            batch = all_events[position : position + args.batch]
            try:
                result = await bus.publish("orders", batch)
            except BusUnavailable:
                await asyncio.sleep(0.1)  # back-off before publishing the batch again
                continue
            position += len(batch)
            db.execute("UPDATE checkpoint SET position = ?", (position,))
            db.execute("INSERT INTO runs VALUES (?, ?)", (result.published, result.duplicates))


if __name__ == "__main__":
    asyncio.run(main())
