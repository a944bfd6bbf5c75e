"""A client that is not tidings (nats-py + the cloudevents SDK) reads what tidings publishes on
JetStream, and tidings consumes what that client publishes."""

from __future__ import annotations

import nats
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from tidings.bus import ConsumerGroup, partition_of
from tidings.bus.nats import NatsBus, NatsBusConfig
from tidings.testing.bus import FAST, Recorder, envelopes
from tidings.testing.events import Credited


async def test_a_foreign_client_reads_tidings_events(nats_url: str) -> None:
    config = NatsBusConfig.from_url(nats_url + "&partitions=4")
    sent = envelopes("order-1", 2, metadata={"correlation_id": "c-1"}) + envelopes("order-2", 1)
    async with NatsBus(config) as bus:
        await bus.publish("orders", sent)
    nc = await nats.connect(config.servers[0])
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe(f"{config.prefix}.orders.>", stream=config.stream_name("orders"))
        msgs = await sub.fetch(3, timeout=10)
        assert len(msgs) == 3
        by_id = {}
        for msg in msgs:
            await msg.ack()
            event = JSONFormat().read(CloudEvent, msg.data)
            assert msg.headers is not None and msg.headers["Nats-Msg-Id"] == event.get_id()
            assert msg.headers["Content-Type"] == "application/cloudevents+json"
            by_id[event.get_id()] = (event, msg.subject)
    finally:
        await nc.close()
    for envelope in sent:
        event, subject = by_id[str(envelope.event_id)]
        assert event.get_type() == "tidings.testing.Credited" and event.get_source() == "tidings/orders"
        assert event.get_subject() == envelope.stream_id
        assert event.get_data() == {"amount": envelope.version}
        assert subject == config.subject(
            "orders", partition_of(envelope.stream_id, 4), "tidings.testing.Credited"
        )
    assert by_id[str(sent[0].event_id)][0].get_attributes()["correlationid"] == "c-1"


async def test_tidings_consumes_what_a_foreign_client_publishes(nats_url: str) -> None:
    config = NatsBusConfig.from_url(nats_url + "&partitions=4")
    recorder = Recorder()
    async with NatsBus(config) as bus:
        group = ConsumerGroup("shipping", "legacy-feed", {"legacy": [Credited]}, FAST)
        await bus.consume(group, recorder.handle, recorder.dead_letter)
        nc = await nats.connect(config.servers[0])
        try:
            js = nc.jetstream()
            for n, (ce_id, amount) in enumerate([("legacy-1", 5), ("legacy-2", 6), ("legacy-1", 5)]):
                sdk_event = CloudEvent(
                    attributes={
                        "id": ce_id,
                        "source": "https://legacy.example.com/orders",
                        "type": "tidings.testing.Credited",
                        "specversion": "1.0",
                        "subject": "order-9",
                        "streamversion": n + 1,
                    },
                    data={"amount": amount},
                )
                subject = config.subject("legacy", partition_of("order-9", 4), "tidings.testing.Credited")
                await js.publish(subject, JSONFormat().write(sdk_event), headers={"Nats-Msg-Id": ce_id})
        finally:
            await nc.close()
        await recorder.wait_for(lambda: len(recorder.messages) == 2, 20, "2 foreign messages")
        # The re-sent "legacy-1" was dropped by the stream's de-duplication.
        assert [m.event for m in recorder.messages] == [Credited(amount=5), Credited(amount=6)]
        assert [m.cloudevent_id for m in recorder.messages] == ["legacy-1", "legacy-2"]
        assert recorder.messages[0].service == "https://legacy.example.com/orders"
        assert recorder.dead == []
