"""A service run as a child process by the lease tests: two of these run one group, one at a time.

Usage: python lease_worker.py STORE_URL EFFECTS_DB

One handler group, ``lease.work``, with two effects per event:
* in the store: it emits one ``Done`` event (committed with the checkpoint, exactly once);
* outside the store: it inserts a row (event id, position, this pid) into another SQLite database,
  with no inbox -- a stand-in for an e-mail or a call to another system, which runs again when an
  event is delivered again.
Prints "ready" once running; exits 0 on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys

from tidings import Event, HandlerContext, Service, SubscriptionConfig, open_store

GROUP = "lease.work"
CONFIG = SubscriptionConfig(batch_size=25, poll_interval=0.05, lease_ttl=1.5)


class Work(Event):
    __event_type__ = "lease.Work"
    n: int


class Done(Event):
    __event_type__ = "lease.Done"
    source: str


async def main(url: str, effects: str) -> None:
    store = await open_store(url).open()
    outside = sqlite3.connect(effects, isolation_level=None, timeout=30)
    outside.execute("PRAGMA synchronous = OFF")  # survives SIGKILL (the OS keeps the pages)
    service = Service("lease", store, config=CONFIG)
    pid = os.getpid()

    @service.handles(Work, group=GROUP)
    async def work(event: Work, ctx: HandlerContext) -> None:
        outside.execute(
            "INSERT INTO effects (event_id, position, pid) VALUES (?, ?, ?)",
            (str(ctx.recorded.event_id), ctx.recorded.position, pid),
        )
        ctx.emit(f"done-{ctx.recorded.stream_id}", [Done(source=str(ctx.recorded.event_id))])

    @service.on_start
    async def ready() -> None:
        print("ready", flush=True)

    try:
        await service.serve()
    finally:
        outside.close()
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
