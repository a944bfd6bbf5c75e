"""Service options for bus-fed handlers: ``ack_wait`` (the failover bound of a killed process) and
the count of duplicated deliveries the inboxes absorbed (``Service.duplicates_skipped``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import wait_until
from tidings import Event, HandlerContext, InvalidArgument, RecordedEvent, Service, SubscriptionConfig
from tidings.bus import encode, open_bus
from tidings.bus.relay import translated_id
from tidings.integration import IntegrationEvent

FAST = SubscriptionConfig(batch_size=100, poll_interval=0.05)


class ParcelLabelled(Event):
    __event_type__ = "tests.svcopts.ParcelLabelled"
    weight: int


class ParcelReady(IntegrationEvent):
    __source__ = "depot"
    __event_type__ = "tests.svcopts.ParcelReady"
    parcel: str


@pytest.mark.parametrize("bad", [0, -1.5, True, "5"])
def test_ack_wait_must_be_a_positive_number(bad: object) -> None:
    with pytest.raises(InvalidArgument, match="ack_wait"):
        Service("depot", "memory://", ack_wait=bad)  # type: ignore[arg-type]


async def test_a_republished_message_is_absorbed_and_counted(tmp_path: Path) -> None:
    handled: list[str] = []
    async with open_bus("memory://") as bus:
        depot = Service("depot", f"sqlite:///{tmp_path}/depot.db", bus=bus, config=FAST)
        courier = Service("courier", f"sqlite:///{tmp_path}/courier.db", bus=bus, config=FAST, ack_wait=2.5)

        @depot.translates(ParcelLabelled)
        def ready(event: ParcelLabelled, recorded: RecordedEvent) -> ParcelReady:
            return ParcelReady(parcel=recorded.stream_id)

        @courier.handles(ParcelReady)
        async def collect(event: ParcelReady, ctx: HandlerContext) -> None:
            handled.append(event.parcel)

        async with depot, courier, depot.running(), courier.running():
            assert [g.consumer_group.delivery.ack_wait for g in courier._inbound] == [2.5]
            await depot.publish("parcel-1", [ParcelLabelled(weight=3)])
            await wait_until(lambda: handled, 30, "the courier to handle the parcel")
            # The same CloudEvent again under a new broker message id: a duplicated delivery.
            (labelled,) = [r async for r in depot.store.read_stream("parcel-1")]
            public = RecordedEvent(
                translated_id(labelled.event_id),
                ParcelReady.__event_type__,
                "parcel-1",
                1,
                labelled.position,
                labelled.timestamp,
                ParcelReady(parcel="parcel-1"),
                {},
            )
            payload = encode(public, "depot")
            assert await bus.publish_raw("depot", ParcelReady.__event_type__, "parcel-1", payload, msg_id="2")
            # The fault happened and was absorbed: the duplicate reached the courier's inbox.
            await wait_until(lambda: courier.duplicates_skipped, 30, "the duplicate to be skipped")
        assert handled == ["parcel-1"]
        assert courier.duplicates_skipped == 1  # still counted once the service has stopped
