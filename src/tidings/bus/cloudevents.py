"""The wire format of the bus: CloudEvents 1.0, structured JSON mode.

One event is one JSON object::

    {"specversion": "1.0", "id": "<event id>", "source": "tidings/<service>",
     "type": "<event type name>", "subject": "<stream id>", "time": "<RFC 3339, UTC>",
     "datacontenttype": "application/json", "data": {...the event's fields...},
     "schemaversion": 1, "streamversion": 7,
     "correlationid": "...", "causationid": "...", "userid": "...",
     "traceparent": "00-...", "tracestate": "...", "tidingsmetadata": "{...other metadata as JSON...}"}

Extension attribute names follow the spec (lower-case letters and digits only). ``traceparent`` and
``tracestate`` are the CloudEvents distributed-tracing extension, carrying W3C trace context.
``streamversion`` is the event's version in its stream, so consumers can check per-aggregate order.

:func:`decode` accepts CloudEvents from any producer (the ``cloudevents`` SDK, another language) as
long as they carry ``subject`` (the stream id, which orders and partitions them) and JSON ``data``;
it raises a subclass of :class:`~tidings.bus.errors.UndecodableMessage` naming what is wrong.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from tidings.bus.errors import InvalidMessageData, NotACloudEvent, UnknownMessageType
from tidings.bus.message import IncomingMessage
from tidings.errors import SerializationError, UpcastError
from tidings.events import Event, EventRegistry, RawEvent, RecordedEvent

__all__ = ["CONTENT_TYPE", "SOURCE_PREFIX", "decode", "encode", "service_of_source"]

CONTENT_TYPE = "application/cloudevents+json"
"""The media type of a structured-mode JSON CloudEvent (for transports with a content-type header)."""

SOURCE_PREFIX = "tidings/"
"""``source`` of events tidings publishes: ``tidings/<service>`` (a relative URI-reference)."""

# Metadata keys carried as extension attributes of their own; everything else rides in
# ``tidingsmetadata`` (extension values must be scalars, so it is a JSON string).
_METADATA_EXTENSIONS = {
    "correlation_id": "correlationid",
    "causation_id": "causationid",
    "user_id": "userid",
    "traceparent": "traceparent",
    "tracestate": "tracestate",
}
_EXTENSION_METADATA = {ext: key for key, ext in _METADATA_EXTENSIONS.items()}
_REQUIRED = ("id", "source", "type")


def encode(envelope: RecordedEvent, service: str) -> bytes:
    """The structured JSON CloudEvent for ``envelope`` published by ``service``.

    Raises :class:`~tidings.errors.SerializationError` if the event or its metadata cannot be
    serialised.
    """
    event = envelope.event
    # The registry's encoding is the one the store uses; embed its bytes without re-parsing.
    data: Any = event.data if isinstance(event, RawEvent) else orjson.Fragment(EventRegistry.encode(event))
    ce: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(envelope.event_id),
        "source": SOURCE_PREFIX + service,
        "type": envelope.event_type,
        "subject": envelope.stream_id,
        "time": _rfc3339(envelope.timestamp),
        "datacontenttype": "application/json",
        "schemaversion": envelope.schema_version,
        "streamversion": envelope.version,
    }
    extra: dict[str, Any] = {}
    for key, value in envelope.metadata.items():
        ext = _METADATA_EXTENSIONS.get(key)
        if ext is not None and value is not None:
            ce[ext] = str(value)
        elif ext is None:
            extra[key] = value
    try:
        if extra:
            ce["tidingsmetadata"] = orjson.dumps(extra, default=_json_default).decode()
        ce["data"] = data
        return orjson.dumps(ce, default=_json_default)
    except TypeError as exc:
        raise SerializationError(
            f"event {envelope.event_id} cannot be encoded as a CloudEvent: {exc}"
        ) from exc


def decode(payload: bytes | str, registry: EventRegistry, *, attempt: int = 1) -> IncomingMessage:
    """Parse and validate one structured JSON CloudEvent into a typed :class:`IncomingMessage`.

    Raises :class:`~tidings.bus.errors.NotACloudEvent` (not JSON, not an object, not CloudEvents
    1.0, a required attribute missing or of the wrong type, data not JSON),
    :class:`~tidings.bus.errors.UnknownMessageType` (no class registered for ``type``) or
    :class:`~tidings.bus.errors.InvalidMessageData` (``data`` fails the class's schema, or an older
    schema version cannot be upcast). All are permanent.
    """
    try:
        ce = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise NotACloudEvent(f"not JSON ({exc})") from exc
    if not isinstance(ce, dict):
        raise NotACloudEvent(f"not a JSON object but a {type(ce).__name__}")
    raw_id = ce.get("id")
    shown_id = raw_id if isinstance(raw_id, str) else None
    shown_type = ce.get("type") if isinstance(ce.get("type"), str) else None

    def bad(reason: str) -> NotACloudEvent:
        return NotACloudEvent(reason, event_id=shown_id, event_type=shown_type)

    if "specversion" not in ce:
        raise bad("not a CloudEvent: missing required attribute 'specversion'")
    if ce["specversion"] != "1.0":
        raise bad(f"unsupported CloudEvents specversion {ce['specversion']!r} (expected '1.0')")
    for name in _REQUIRED:
        value = ce.get(name)
        if value is None:
            raise bad(f"missing required attribute {name!r}")
        if not isinstance(value, str) or not value:
            raise bad(f"attribute {name!r} must be a non-empty string, got {value!r}")
    subject = ce.get("subject")
    if not isinstance(subject, str) or not subject:
        raise bad("missing attribute 'subject' (the stream id; tidings orders and partitions by it)")
    content_type = ce.get("datacontenttype", "application/json")
    if not isinstance(content_type, str) or not _is_json_media_type(content_type):
        raise bad(f"datacontenttype {content_type!r} is not JSON")
    if "data_base64" in ce:
        raise bad("binary data (data_base64) is not supported; data must be JSON")
    if "data" not in ce:
        raise bad("missing 'data'")
    time = _parse_time(ce.get("time"), bad)
    schema_version = _int_extension(ce, "schemaversion", 1, bad)
    stream_version = _int_extension(ce, "streamversion", None, bad)

    event_type: str = ce["type"]
    source: str = ce["source"]
    cls = registry.get(event_type)
    if cls is None:
        raise UnknownMessageType(
            f"no event class is registered for type {event_type!r}", event_id=shown_id, event_type=event_type
        )
    try:
        event = registry.decode(event_type, schema_version, orjson.dumps(ce["data"]))
    except (SerializationError, UpcastError) as exc:
        raise InvalidMessageData(str(exc), event_id=shown_id, event_type=event_type) from exc
    assert isinstance(event, Event)  # the class is registered, so decode returned a typed event

    metadata: dict[str, Any] = {}
    packed = ce.get("tidingsmetadata")
    if isinstance(packed, str):
        try:
            extra = orjson.loads(packed)
        except orjson.JSONDecodeError as exc:
            raise bad(f"extension 'tidingsmetadata' is not JSON ({exc})") from exc
        if isinstance(extra, dict):
            metadata.update(extra)
    for ext, key in _EXTENSION_METADATA.items():
        value = ce.get(ext)
        if value is not None:
            metadata[key] = str(value)

    cloudevent_id: str = ce["id"]
    try:
        event_id = uuid.UUID(cloudevent_id)
    except ValueError:
        # Foreign producers may use any string id; (source, id) is unique per the spec.
        event_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{source}#{cloudevent_id}")
    return IncomingMessage(
        event_id=event_id,
        event_type=event_type,
        source=source,
        service=service_of_source(source),
        stream_id=subject,
        stream_version=stream_version,
        schema_version=schema_version,
        time=time,
        event=event,
        metadata=metadata,
        cloudevent_id=cloudevent_id,
        attempt=attempt,
    )


def service_of_source(source: str) -> str:
    """The publishing service named by a ``source`` attribute (``tidings/<service>``), else the source."""
    return source[len(SOURCE_PREFIX) :] if source.startswith(SOURCE_PREFIX) else source


def _rfc3339(value: datetime) -> str:
    text = value.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def _is_json_media_type(value: str) -> bool:
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media == "text/json"


def _parse_time(value: Any, bad: Any) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad(f"attribute 'time' must be an RFC 3339 string, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise bad(f"attribute 'time' is not an RFC 3339 timestamp: {value!r}") from exc
    if parsed.tzinfo is None:
        raise bad(f"attribute 'time' has no UTC offset: {value!r}")
    return parsed


def _int_extension(ce: Mapping[str, Any], name: str, default: Any, bad: Any) -> Any:
    value = ce.get(name)
    if value is None:
        return default
    # Some producers send every extension as a string (HTTP binary mode habits); accept digits.
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise bad(f"extension {name!r} must be an integer >= 1, got {value!r}")
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__qualname__} is not JSON serialisable")
