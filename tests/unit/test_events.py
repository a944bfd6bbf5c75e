"""Event classes, the type registry and upcasters."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tidings import DuplicateEventType, Event, EventRegistry, EventTypeError, default_registry, upcaster


class ParcelShipped(Event):
    parcel: str
    weight_g: int


class Renamed(Event):
    __event_type__ = "shipping.ParcelLost"
    __event_version__ = 2
    parcel: str


def test_type_name_and_version_defaults() -> None:
    assert ParcelShipped.__event_type__ == "ParcelShipped"
    assert ParcelShipped.__event_version__ == 1
    assert Renamed.__event_type__ == "shipping.ParcelLost"
    assert Renamed.__event_version__ == 2
    assert default_registry.get("ParcelShipped") is ParcelShipped
    assert default_registry.get("shipping.ParcelLost") is Renamed


def test_subclass_does_not_inherit_type_name() -> None:
    class Base(Event):
        __event_type__ = "tests.Base"
        __event_register__ = False

    class Child(Base):
        __event_register__ = False

    assert Child.__event_type__ == "Child"


def test_events_are_frozen_and_validated() -> None:
    event = ParcelShipped(parcel="p1", weight_g=10)
    with pytest.raises(ValidationError):
        event.weight_g = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        ParcelShipped(parcel="p1", weight_g="heavy")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ParcelShipped(parcel="p1", weight_g=1, extra=True)  # type: ignore[call-arg]


def test_duplicate_type_names_are_refused() -> None:
    with pytest.raises(DuplicateEventType) as info:

        class ParcelShipped(Event):  # same name as the module-level class, another class
            parcel: str

    assert "ParcelShipped" in str(info.value)


def test_bad_event_version() -> None:
    with pytest.raises(EventTypeError):

        class Bad(Event):
            __event_version__ = 0
            __event_register__ = False


def test_encode_decode_roundtrip_and_upcast_chain() -> None:
    registry = EventRegistry()

    class Moved(Event):
        __event_type__ = "tests.Moved"
        __event_version__ = 3
        __event_register__ = False
        to: str
        floor: int

    registry.register(Moved)

    @upcaster("tests.Moved", from_version=1, registry=registry)
    def _v1(data: dict[str, object]) -> dict[str, object]:
        return {"to": data["destination"]}

    @upcaster(Moved, from_version=2, registry=registry)
    def _v2(data: dict[str, object]) -> dict[str, object]:
        return {**data, "floor": 0}

    assert registry.decode("tests.Moved", 1, b'{"destination":"Oslo"}') == Moved(to="Oslo", floor=0)
    assert registry.decode("tests.Moved", 2, b'{"to":"Rome"}') == Moved(to="Rome", floor=0)
    data = registry.encode(Moved(to="Paris", floor=2))
    assert registry.decode("tests.Moved", 3, data) == Moved(to="Paris", floor=2)
    with pytest.raises(EventTypeError):
        registry.add_upcaster("tests.Moved", 1, lambda d: d)  # a second, different upcaster


def test_generated_event_ids_are_time_ordered_uuid7() -> None:
    import time
    import uuid

    from tidings.store.append import new_event_ids

    before = time.time_ns() // 1_000_000
    ids = new_event_ids(2000)
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 2000
    for value in ids:
        assert value.version == 7 and value.variant == uuid.RFC_4122
        assert uuid.UUID(str(value)) == value and uuid.UUID(bytes=value.bytes) == value
        assert before <= value.int >> 80 <= after  # the millisecond timestamp prefix
    later = new_event_ids(1)[0]
    time.sleep(0.002)  # the scenario: a later millisecond
    assert new_event_ids(1)[0] > later  # later ids sort after earlier ones


def test_recorded_event_is_immutable_and_builds_id_and_time_lazily() -> None:
    import uuid
    from datetime import UTC, datetime

    from tidings import RecordedEvent

    event_id = uuid.uuid4()
    recorded = RecordedEvent(
        event_id.bytes, "ParcelShipped", "p-1", 1, 7, 1_000_000, ParcelShipped(parcel="p", weight_g=1), {}
    )
    assert recorded.event_id == event_id
    assert recorded.timestamp == datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)
    with pytest.raises(AttributeError):
        recorded.version = 2  # type: ignore[misc]
    same = RecordedEvent(
        event_id, "ParcelShipped", "p-1", 1, 7, recorded.timestamp, ParcelShipped(parcel="p", weight_g=1), {}
    )
    assert same == recorded and hash(same) == hash(recorded)
    assert "p-1" in repr(recorded)


def test_recorded_event_fields_are_all_read_only() -> None:
    import uuid

    from tidings import RecordedEvent

    event = ParcelShipped(parcel="p", weight_g=1)
    recorded = RecordedEvent(uuid.uuid4().bytes, "ParcelShipped", "p-1", 2, 9, 5, event, {"user_id": "u"}, 3)
    fields = ("event_id", "event_type", "stream_id", "version", "position", "timestamp", "event")
    for name in (*fields, "metadata", "schema_version", "unknown_field"):
        with pytest.raises(AttributeError):
            setattr(recorded, name, None)
    assert (recorded.stream_id, recorded.version, recorded.position, recorded.event) == ("p-1", 2, 9, event)
    assert (recorded.event_type, recorded.schema_version, recorded.metadata) == (
        "ParcelShipped",
        3,
        {"user_id": "u"},
    )
    assert recorded.event_id is recorded.event_id  # built once, then kept
