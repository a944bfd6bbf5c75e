"""The CloudEvents wire format: what tidings writes, what it accepts, and the SDK reading and writing it."""

from __future__ import annotations

import re
import uuid
from typing import Any

import orjson
import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from tidings.bus import (
    InvalidMessageData,
    NotACloudEvent,
    UndecodableMessage,
    UnknownMessageType,
    decode,
    encode,
)
from tidings.errors import is_permanent
from tidings.events import Event, EventRegistry, default_registry
from tidings.testing.bus import envelopes
from tidings.testing.events import Credited, Noted

META = {
    "correlation_id": "corr-7",
    "causation_id": "cause-7",
    "user_id": "ann",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "congo=t61rcWkgMzE",
    "tenant": "acme",
}


def one(**kwargs: Any) -> bytes:
    return encode(envelopes("order-1", 1, start=4, metadata=META, **kwargs)[0], "orders")


def test_structured_json_attributes() -> None:
    envelope = envelopes("order-1", 1, start=4, metadata=META)[0]
    ce = orjson.loads(encode(envelope, "orders"))
    assert ce["specversion"] == "1.0"
    assert ce["id"] == str(envelope.event_id)
    assert ce["source"] == "tidings/orders"
    assert ce["type"] == "tidings.testing.Credited"
    assert ce["subject"] == "order-1"
    assert ce["datacontenttype"] == "application/json"
    assert ce["data"] == {"amount": 4}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", ce["time"])
    assert (ce["schemaversion"], ce["streamversion"]) == (1, 4)
    assert (ce["correlationid"], ce["causationid"], ce["userid"]) == ("corr-7", "cause-7", "ann")
    assert ce["traceparent"] == META["traceparent"] and ce["tracestate"] == META["tracestate"]
    assert orjson.loads(ce["tidingsmetadata"]) == {"tenant": "acme"}
    # CloudEvents attribute names: lower-case letters and digits only.
    assert all(re.fullmatch(r"[a-z0-9]+", name) for name in ce)


def test_round_trip() -> None:
    envelope = envelopes("order-1", 1, start=4, metadata=META, event=lambda v: Noted(text='zß"\n✓'))[0]
    message = decode(encode(envelope, "orders"), default_registry, attempt=2)
    assert message.event == Noted(text='zß"\n✓')
    assert (message.event_id, message.cloudevent_id) == (envelope.event_id, str(envelope.event_id))
    assert (message.service, message.source, message.stream_id) == ("orders", "tidings/orders", "order-1")
    assert (message.stream_version, message.schema_version, message.attempt) == (4, 1, 2)
    assert message.time == envelope.timestamp
    assert dict(message.metadata) == META
    assert message.correlation_id == "corr-7" and message.causation_id == "cause-7"


def test_the_cloudevents_sdk_reads_what_tidings_writes() -> None:
    envelope = envelopes("order-1", 1, start=4, metadata=META)[0]
    event = JSONFormat().read(CloudEvent, encode(envelope, "orders"))
    attributes = event.get_attributes()
    assert attributes["id"] == str(envelope.event_id)
    assert attributes["source"] == "tidings/orders"
    assert attributes["type"] == "tidings.testing.Credited"
    assert attributes["subject"] == "order-1"
    assert attributes["time"] == envelope.timestamp
    assert attributes["correlationid"] == "corr-7" and attributes["streamversion"] == 4
    assert event.get_data() == {"amount": 4}


def test_tidings_reads_what_the_cloudevents_sdk_writes() -> None:
    sdk_event = CloudEvent(
        attributes={
            "id": "legacy-42",
            "source": "https://legacy.example.com/orders",
            "type": "tidings.testing.Credited",
            "specversion": "1.0",
            "subject": "order-9",
            "datacontenttype": "application/json",
            "correlationid": "corr-x",
        },
        data={"amount": 5},
    )
    message = decode(JSONFormat().write(sdk_event), default_registry)
    assert message.event == Credited(amount=5)
    assert message.cloudevent_id == "legacy-42"
    assert message.event_id == uuid.uuid5(uuid.NAMESPACE_URL, "https://legacy.example.com/orders#legacy-42")
    assert (message.service, message.stream_id, message.stream_version) == (
        "https://legacy.example.com/orders",
        "order-9",
        None,
    )
    assert message.correlation_id == "corr-x" and message.time is not None


def with_(changes: dict[str, Any], drop: tuple[str, ...] = ()) -> bytes:
    ce = orjson.loads(one())
    ce.update(changes)
    for name in drop:
        del ce[name]
    return orjson.dumps(ce)


@pytest.mark.parametrize(
    ("payload", "kind", "says"),
    [
        (b"{oops", NotACloudEvent, "not JSON"),
        (b"42", NotACloudEvent, "not a JSON object"),
        (with_({}, drop=("specversion",)), NotACloudEvent, "'specversion'"),
        (with_({"specversion": "0.3"}), NotACloudEvent, "0.3"),
        (with_({}, drop=("id",)), NotACloudEvent, "'id'"),
        (with_({}, drop=("source",)), NotACloudEvent, "'source'"),
        (with_({}, drop=("type",)), NotACloudEvent, "'type'"),
        (with_({"id": 7}), NotACloudEvent, "'id'"),
        (with_({}, drop=("subject",)), NotACloudEvent, "'subject'"),
        (with_({"datacontenttype": "text/plain"}), NotACloudEvent, "text/plain"),
        (with_({}, drop=("data",)), NotACloudEvent, "'data'"),
        (with_({"time": "yesterday"}), NotACloudEvent, "'time'"),
        (with_({"streamversion": "x"}), NotACloudEvent, "streamversion"),
        (with_({"type": "nobody.Knows"}), UnknownMessageType, "nobody.Knows"),
        (with_({"data": {"amount": "lots"}}), InvalidMessageData, "amount"),
        (with_({"data": {"amount": 1, "extra": 2}}), InvalidMessageData, "extra"),
        (with_({"schemaversion": 9}), InvalidMessageData, "newer"),
    ],
)
def test_bad_messages_raise_typed_permanent_errors(payload: bytes, kind: type[Exception], says: str) -> None:
    with pytest.raises(kind) as info:
        decode(payload, default_registry)
    assert isinstance(info.value, UndecodableMessage) and is_permanent(info.value)
    assert says in str(info.value)
    assert says in info.value.reason or says in str(info.value)


def test_older_schema_versions_are_upcast() -> None:
    registry = EventRegistry()

    class Shipped(Event):
        __event_type__ = "tests.bus.Shipped"
        __event_version__ = 2
        __event_register__ = False
        carrier: str
        parcels: int

    registry.register(Shipped)
    registry.add_upcaster("tests.bus.Shipped", 1, lambda d: {**d, "parcels": 1})
    payload = orjson.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": "tidings/warehouse",
            "type": "tests.bus.Shipped",
            "subject": "parcel-1",
            "schemaversion": 1,
            "data": {"carrier": "DHL"},
        }
    )
    message = decode(payload, registry)
    assert message.event == Shipped(carrier="DHL", parcels=1)
    assert message.schema_version == 1 and message.service == "warehouse"
