"""A service run as a child process by the crash tests, and SIGKILLed at random moments.

Usage: python crash_worker.py STORE_URL EFFECTS_DB [--redeliver]

Three groups, one per kind of effect:
* a projection counting deposits per account (rows in the store's database);
* a handler emitting one ``Audited`` event per deposit (events in the store);
* a handler recording each deposit in *another* database through an inbox.
With --redeliver every group's checkpoint is rewound to 0 first (inboxes kept): every event is
delivered again. Prints "ready" once running; exits 0 on SIGTERM.
"""

from __future__ import annotations

import asyncio
import sys

from tidings import (
    Event,
    HandlerContext,
    Projection,
    ProjectionTx,
    Service,
    SQLiteInbox,
    SubscriptionConfig,
    open_store,
)


class Deposited(Event):
    __event_type__ = "crash.Deposited"
    amount: int


class Audited(Event):
    __event_type__ = "crash.Audited"
    source: str


class Totals(Projection):
    name = "totals"
    tables = {"totals": "CREATE TABLE {totals} (account TEXT PRIMARY KEY, n INTEGER NOT NULL)"}

    def deposited(self, event: Deposited, tx: ProjectionTx) -> None:
        tx.execute(
            "INSERT INTO {totals} VALUES (?, 1) ON CONFLICT (account) DO UPDATE SET n = {totals}.n + 1",
            (tx.recorded.stream_id,),
        )


async def main(url: str, effects: str, redeliver: bool) -> None:
    store = await open_store(url).open()
    inbox = SQLiteInbox(f"sqlite:///{effects}")
    # A short lease: the next round's process takes over from a killed one without waiting long,
    # so that the kills keep hitting work in progress rather than a standby.
    config = SubscriptionConfig(batch_size=37, poll_interval=0.05, lease_ttl=0.5)
    service = Service("crash", store, config=config)
    service.add_projection(Totals())

    @service.handles(Deposited)
    async def audit(event: Deposited, ctx: HandlerContext) -> None:
        ctx.emit(f"audit-{ctx.recorded.stream_id}", [Audited(source=str(ctx.recorded.event_id))])

    @service.handles(Deposited)
    async def external(event: Deposited, ctx: HandlerContext) -> None:
        def effect(db):  # type: ignore[no-untyped-def]
            db.execute("CREATE TABLE IF NOT EXISTS effects (event_id TEXT NOT NULL)")
            db.execute("INSERT INTO effects VALUES (?)", (str(ctx.recorded.event_id),))

        await inbox.once(ctx.recorded.event_id, effect, scope=ctx.group)

    if redeliver:
        for group in ("crash.audit", "crash.external"):
            await store.set_checkpoint(group, 0)
    print("ready", flush=True)
    try:
        await service.serve()
    finally:
        inbox.close()
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], "--redeliver" in sys.argv))
