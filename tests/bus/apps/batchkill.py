"""A service for the batch fault test, run with ``tidings run batchkill:stock``.

It handles ``batchkill.Shipped`` integration events of service ``orders`` from the bus and records
each in its ``effects`` table with ``ctx.execute`` (committed with the inbox rows, so exactly once).
With ``BATCHKILL_MARKER`` set to a path that does not exist yet, the process creates that file and
SIGKILLs itself right after the first batch of more than one message has committed, before the bus
acknowledges it: the fault the test needs, at the one moment it is about.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path

from tidings import HandlerContext, RetryPolicy, Service, SubscriptionConfig
from tidings.bus import BatchOutcome, IncomingMessage
from tidings.bus.inbound import BusHandlerGroup
from tidings.integration import IntegrationEvent

CONFIG = SubscriptionConfig(poll_interval=0.05, retry=RetryPolicy(max_attempts=5, initial_delay=0.01))


class Shipped(IntegrationEvent):
    __source__ = "orders"
    __event_type__ = "batchkill.Shipped"
    n: int


stock = Service("stock", config=CONFIG, ack_wait=2.0)


@stock.handles(Shipped)
async def record(event: Shipped, ctx: HandlerContext) -> None:
    ctx.execute(
        "INSERT INTO effects (event_id, stream_id, version) VALUES (?, ?, ?)",
        (str(ctx.recorded.event_id), ctx.recorded.stream_id, ctx.recorded.version),
    )


@stock.on_start
async def create_table() -> None:
    await stock.store.transaction(  # type: ignore[attr-defined]
        lambda tx: tx.execute(
            "CREATE TABLE IF NOT EXISTS effects (event_id TEXT, stream_id TEXT, version INTEGER)"
        )
    )


_marker = os.environ.get("BATCHKILL_MARKER")
if _marker and not Path(_marker).exists():
    _original = BusHandlerGroup.on_batch

    async def _commit_then_die(self: BusHandlerGroup, messages: Sequence[IncomingMessage]) -> BatchOutcome:
        outcome = await _original(self, messages)
        if len(messages) > 1 and outcome.done == len(messages):
            Path(_marker).write_text(str(len(messages)))  # noqa: ASYNC240 - the process dies next
            os.kill(os.getpid(), signal.SIGKILL)  # committed, never acknowledged
        return outcome

    BusHandlerGroup.on_batch = _commit_then_die  # type: ignore[method-assign]
