"""A handler that emits an event JSON cannot hold: parked at once, nothing stored, the group goes on.

Before NaN was refused at encode, such an emit stored ``null`` in a float field and the emitted
stream could never be read again. Runs on every backend.
"""

from __future__ import annotations

import math

from tidings import Event, EventStore, HandlerContext, RetryPolicy, Service, SubscriptionConfig
from tidings.testing import collect

FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.05, retry=RetryPolicy(max_attempts=3, initial_delay=0.001, max_delay=0.01)
)


class Measured(Event):
    __event_type__ = "tests.bad_emits.Measured"
    value: float


class Rated(Event):
    __event_type__ = "tests.bad_emits.Rated"
    ratio: float


async def test_handler_emitting_nan_is_parked_at_once_and_writes_nothing(store: EventStore) -> None:
    service = Service("rates", store, config=FAST)
    attempts: list[float] = []

    @service.handles(Measured)
    async def rate(event: Measured, ctx: HandlerContext) -> None:
        attempts.append(event.value)
        ctx.emit("ratios", [Rated(ratio=1 / event.value if event.value else math.inf)])

    for value in (2.0, 0.0, 4.0):
        last = await store.append("sensor", [Measured(value=value)])
    async with service.running():
        assert await service.wait_for(last.position, timeout=10)
    [dead] = await store.dead_letters()
    assert dead.position == 2 and "SerializationError" in dead.error and "ratio" in dead.error
    assert dead.attempts == 1  # permanent: no retries spent on it
    assert attempts == [2.0, 0.0, 4.0]
    # The emitted stream holds the good events only, and reads.
    assert [e.event for e in await collect(store.read_stream("ratios"))] == [
        Rated(ratio=0.5),
        Rated(ratio=0.25),
    ]
