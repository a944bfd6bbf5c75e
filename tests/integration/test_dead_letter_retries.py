"""A dead letter retried twice at once is applied once: one retry commits the handler's effects and
removes it, the other finds it gone, raises :class:`DeadLetterNotFound` and commits nothing.

On every backend (one store), and on SQLite and PostgreSQL also with two store objects on one
database, as two ``tidings dlq retry`` processes would be. Both retries are held inside the
handler until both have reached it, so the two commits really race; without the check, both
commits went through and the effect (a counter updated with ``ctx.execute``) was applied twice.
"""

from __future__ import annotations

import asyncio

import pytest

from tidings import (
    DeadLetterNotFound,
    Event,
    EventStore,
    HandlerContext,
    RetryPolicy,
    Service,
    SQLStore,
    SubscriptionConfig,
    open_store,
)
from tidings.testing import collect

FAST = SubscriptionConfig(
    batch_size=10, poll_interval=0.05, retry=RetryPolicy(max_attempts=1, initial_delay=0.001, max_delay=0.01)
)


class PaymentFailed(Event):
    __event_type__ = "tests.dlq.PaymentFailed"
    order_id: str


class RefundIssued(Event):
    __event_type__ = "tests.dlq.RefundIssued"
    order_id: str


class Refunds:
    """The service under test: a handler that refunds (an event and a counter row) once it works."""

    def __init__(self) -> None:
        self.broken = True
        self.entered = 0
        self.both_in = asyncio.Event()

    def service(self, store: EventStore, *, sql: bool) -> Service:
        service = Service("billing", store, config=FAST)

        @service.handles(PaymentFailed)
        async def refund(event: PaymentFailed, ctx: HandlerContext) -> None:
            if self.broken:
                raise ValueError("the payment provider is down")
            self.entered += 1
            if self.entered == 2:
                self.both_in.set()
            await asyncio.wait_for(self.both_in.wait(), timeout=30)
            ctx.emit(f"refund-{event.order_id}", [RefundIssued(order_id=event.order_id)])
            if sql:
                ctx.execute("UPDATE refund_count SET n = n + 1")

        return service


async def test_two_concurrent_retries_of_one_dead_letter_apply_it_once(store: EventStore) -> None:
    await two_concurrent_retries(store, store)


@pytest.mark.needs("shared")
async def test_two_concurrent_retries_from_two_store_objects_apply_it_once(
    store: EventStore, store_url: str
) -> None:
    """As two ``tidings dlq retry`` processes would: each with a store of its own on one database."""
    async with open_store(store_url) as other:
        await two_concurrent_retries(store, other)


async def two_concurrent_retries(store: EventStore, other: EventStore) -> None:
    sql = isinstance(store, SQLStore)  # the counter effect needs SQL; the race is the same without
    if sql:
        await store.transaction(lambda tx: tx.execute("CREATE TABLE refund_count (n integer NOT NULL)"))
        await store.transaction(lambda tx: tx.execute("INSERT INTO refund_count VALUES (0)"))
    refunds = Refunds()
    first, second = refunds.service(store, sql=sql), refunds.service(other, sql=sql)
    result = await store.append("order-1", [PaymentFailed(order_id="1")])
    async with first.running():
        assert await first.wait_for(result.position, timeout=30)
    [dead] = await store.dead_letters()

    refunds.broken = False
    group = dead.group
    outcomes = await asyncio.gather(
        first.subscription(group).retry_dead_letter(dead),
        second.subscription(group).retry_dead_letter(dead),
        return_exceptions=True,
    )

    assert refunds.entered == 2  # the race really happened: both retries ran the handler
    assert sorted(map(repr, outcomes)) == sorted(map(repr, [True, DeadLetterNotFound(group, dead.id)]))
    gone = next(o for o in outcomes if isinstance(o, BaseException))
    assert isinstance(gone, DeadLetterNotFound) and gone.id == dead.id and gone.group == group
    assert await store.dead_letters() == [] and await other.dead_letters() == []
    assert [type(e.event) for e in await collect(store.read_stream("refund-1"))] == [RefundIssued]
    if sql:
        assert await store.query("SELECT n FROM refund_count") == [(1,)]
