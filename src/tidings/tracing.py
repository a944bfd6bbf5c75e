"""Trace context on every event (W3C ``traceparent``), and OpenTelemetry spans when it is installed.

**Trace context, always.** Every stored event's metadata carries ``traceparent`` (and
``tracestate`` when there is one), with or without OpenTelemetry:

* appended inside an active OpenTelemetry span while spans are on (:func:`enabled`; tidings' own
  ``tidings.append`` span counts): that span's context;
* emitted or saved by a handler, a saga step or a projection (through its ``ctx``): a child of
  the handled event's trace -- same trace id, a new span id (one per handler call), the handled
  event's ``tracestate`` carried on -- so one business transaction is one trace;
* otherwise: a new trace, flagged *sampled* (the event log records it).

A ``traceparent`` given in the append's own metadata is kept as given, after a check: a malformed
one raises :class:`~tidings.InvalidArgument` and nothing is written. A malformed ``traceparent``
on an event that is being *handled* (a foreign producer's message) is ignored, as the W3C spec
asks of a receiver: the handler's effects start a new trace. Over the bus, the context rides in
the CloudEvents distributed-tracing extension attributes of the same names.

**Spans, when OpenTelemetry is installed** (``pip install 'tidings[otel]'``, then configure a
``TracerProvider`` as usual). Decided once, at import: without the ``opentelemetry`` package no
span code runs at all; with it, no span is started either until a tracer provider is configured
(one ``isinstance`` check per operation). :func:`disable` turns the spans off (trace context
stays), :func:`enable` turns them on again, optionally with a provider of its own instead of the
global one.

* ``tidings.append`` (PRODUCER): an append through ``EventStore.append``; its events' ``traceparent``
  is this span, so the spans that handle them are its children;
* ``tidings.publish`` (CLIENT): one ``Bus.publish`` call of the outbox relay, linked to each
  message's creation context;
* ``tidings.handle`` (CONSUMER): one handler call for one event (per event, not per batch, so each
  is the child of the ``traceparent`` of the event it handles, across processes too);
* ``tidings.projection`` (CONSUMER): one projection batch, linked to each event's context (a batch
  mixes many traces, so it can be the child of none);
* ``tidings.saga.step`` (INTERNAL): a saga reacting to an event, inside its ``tidings.handle`` span;
* ``tidings.dead_letter`` (INTERNAL): an event parked in the dead letters, a child of its trace.

A failed handler call's span has ``tidings.outcome`` = ``error`` and the exception; a retry is the
next ``tidings.handle`` span with ``tidings.attempt`` one higher, and giving up is the
``tidings.dead_letter`` span (``tidings.outcome`` = ``dead_letter``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from random import getrandbits, randbytes
from typing import TYPE_CHECKING, Any

from tidings.errors import InvalidArgument, MissingExtra

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from tidings.events import RecordedEvent
    from tidings.store.append import AppendResult

try:
    from opentelemetry import trace as _otel
except ImportError:  # the 'otel' extra is not installed: trace context only, no spans
    _otel = None  # type: ignore[assignment]
    _NO_PROVIDER: tuple[type, ...] = ()
else:
    _NO_PROVIDER = (_otel.ProxyTracerProvider, _otel.NoOpTracerProvider)

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "TraceParent",
    "append_span",
    "child_of",
    "dead_lettered",
    "disable",
    "enable",
    "enabled",
    "handle_span",
    "parse_traceparent",
    "projection_span",
    "publish_span",
    "saga_step_span",
    "stamp",
    "stamped_json",
]

TRACEPARENT = "traceparent"
"""The metadata key (and CloudEvents extension attribute) of the W3C ``traceparent`` header."""

TRACESTATE = "tracestate"
"""The metadata key (and CloudEvents extension attribute) of the W3C ``tracestate`` header."""

SYSTEM = "tidings"
"""``messaging.system`` of tidings' spans."""

# version "00" exactly, or a later version that may append fields (W3C trace-context, level 1).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A parsed W3C ``traceparent``: trace id (128 bits), parent span id (64 bits), flags."""

    trace_id: int
    span_id: int
    flags: int = 1

    @classmethod
    def parse(cls, header: str) -> TraceParent:
        """Parse a ``traceparent`` header; raises :class:`~tidings.InvalidArgument` if it is malformed
        (not ``VV-<32 hex>-<16 hex>-<2 hex>``, version ``ff``, extra fields on version ``00``, or an
        all-zero trace or span id)."""
        match = _TRACEPARENT.fullmatch(header) if isinstance(header, str) else None
        if match is None:
            raise InvalidArgument(
                f"malformed traceparent {header!r:.80}: expected 00-<32 hex>-<16 hex>-<2 hex>"
            )
        version, trace_id, span_id, flags, rest = match.groups()
        if version == "ff" or (version == "00" and rest is not None):
            raise InvalidArgument(f"malformed traceparent {header!r:.80}: bad version or trailing data")
        parsed = cls(int(trace_id, 16), int(span_id, 16), int(flags, 16))
        if not parsed.trace_id or not parsed.span_id:
            raise InvalidArgument(f"malformed traceparent {header!r:.80}: all-zero trace or span id")
        return parsed

    @classmethod
    def new(cls) -> TraceParent:
        """The root of a new trace: random ids, sampled."""
        return cls(getrandbits(128) or 1, getrandbits(64) or 1, 1)

    def child(self) -> TraceParent:
        """The same trace, a new span id, the same flags."""
        return TraceParent(self.trace_id, getrandbits(64) or 1, self.flags)

    @property
    def trace_id_hex(self) -> str:
        """The trace id as the 32 lower-case hex digits the header and trace viewers show."""
        return f"{self.trace_id:032x}"

    @property
    def sampled(self) -> bool:
        """The *sampled* flag: the producer may have recorded this trace."""
        return bool(self.flags & 1)

    def header(self) -> str:
        """The ``traceparent`` header value (version 00)."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"


def parse_traceparent(value: object) -> TraceParent | None:
    """The trace parent in a received ``traceparent`` value, or None if it is absent or malformed
    (a receiver ignores a bad header and starts a new trace; it never fails the message)."""
    if not isinstance(value, str):
        return None
    try:
        return TraceParent.parse(value)
    except InvalidArgument:
        return None


# -- trace context on events -----------------------------------------------------------------------

_tracer: Tracer | None = None
"""The tracer of tidings' spans; None when spans are off (no OpenTelemetry, or :func:`disable`)."""


def _active_span_context() -> dict[str, str] | None:
    """The trace keys of the active OpenTelemetry span, if spans are on (:func:`enabled`) and
    there is one."""
    if not enabled():
        return None
    context = _otel.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    keys = {TRACEPARENT: f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"}
    state = context.trace_state.to_header()
    if state:
        keys[TRACESTATE] = state
    return keys


def child_of(parent: Mapping[str, Any]) -> dict[str, str]:
    """The trace keys for an effect of the event whose metadata is ``parent``: the active span's
    context if there is one, else a child of ``parent``'s trace (its ``tracestate`` carried on),
    else -- no parent, or a malformed one -- a new trace."""
    active = _active_span_context()
    if active is not None:
        return active
    traced = parse_traceparent(parent.get(TRACEPARENT))
    if traced is None:
        return {TRACEPARENT: _new_trace()}
    keys = {TRACEPARENT: traced.child().header()}
    state = parent.get(TRACESTATE)
    if isinstance(state, str) and state:
        keys[TRACESTATE] = state
    return keys


def stamp(metadata: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """``metadata`` with trace context: kept if it has a ``traceparent`` (checked; raises
    :class:`~tidings.InvalidArgument` if malformed), else the active span's or a new trace's.
    Called by every append (``EventStore.prepare_append``)."""
    if metadata is None:
        active = _active_span_context()
        if active is not None:
            return active
        return {TRACEPARENT: _new_trace()}
    given = metadata.get(TRACEPARENT)
    if given is not None:
        TraceParent.parse(given)
        return metadata
    return {**metadata, **(_active_span_context() or {TRACEPARENT: _new_trace()})}


def stamped_json(
    metadata: Mapping[str, Any] | None, encode: Callable[[Mapping[str, Any] | None], bytes | None]
) -> bytes | None:
    """``encode(stamp(metadata))``: the stored JSON of an append's metadata, with trace context.

    The common case -- no metadata, no active span -- is written directly, without building and
    encoding a dict: it runs on every plain append."""
    if metadata is None and _active_span_context() is None:
        return f'{{"{TRACEPARENT}":"{_new_trace()}"}}'.encode()
    return encode(stamp(metadata))


def _new_trace() -> str:
    # Built from one hex string (not through TraceParent): this runs on every plain append.
    ids = randbytes(24).hex()
    if ids[32:] == _ZERO_SPAN:  # the spec forbids an all-zero id (the trace id's odds are nil)
        return TraceParent.new().header()
    return f"00-{ids[:32]}-{ids[32:]}-01"


_ZERO_SPAN = "0" * 16


# -- spans ---------------------------------------------------------------------------------------------


def _live_tracer() -> Tracer | None:
    return _tracer if enabled() else None


_provider_known = False
"""True when :func:`enable` was given a provider of its own, or a global one has been set (which
cannot be unset): then spans are on without looking again."""


def enabled() -> bool:
    """True if tidings records OpenTelemetry spans: the package is installed, spans are not
    turned off by :func:`disable`, and there is a tracer provider -- the one given to
    :func:`enable`, or a global one (until one is set, the API's stand-in would record nothing,
    so no span is started)."""
    global _provider_known
    if _tracer is None:
        return False
    if not _provider_known:
        # get_tracer_provider() looks the environment up on each call until a provider is set,
        # which costs as much as a plain append; the global it fills in is read first (enable()
        # made the call once, so a provider named by the environment is loaded by then).
        if getattr(_otel, "_TRACER_PROVIDER", True) is None:
            return False
        _provider_known = not isinstance(_otel.get_tracer_provider(), _NO_PROVIDER)
    return _provider_known


def enable(tracer_provider: TracerProvider | None = None) -> None:
    """Record spans, with ``tracer_provider`` (default: the global one, as configured with
    ``opentelemetry.trace.set_tracer_provider``, also when it is set later). On by default when
    the ``opentelemetry-api`` package is installed; raises :class:`~tidings.MissingExtra` if not."""
    global _tracer, _provider_known
    if _otel is None:
        raise MissingExtra("OpenTelemetry spans", "otel")
    _tracer = _otel.get_tracer("tidings", tracer_provider=tracer_provider)
    _provider_known = tracer_provider is not None or not isinstance(_otel.get_tracer_provider(), _NO_PROVIDER)


def disable() -> None:
    """Record no spans (events still get their trace context); :func:`enable` undoes it."""
    global _tracer, _provider_known
    _tracer, _provider_known = None, False


class _NoSpan:
    """What the span helpers give while spans are off: does nothing, at the cost of a call."""

    __slots__ = ()

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def appended(self, result: AppendResult) -> None:
        """Nothing to record."""

    def set(self, key: str, value: str | int) -> None:
        """Nothing to record."""


_NO_SPAN = _NoSpan()


class _Span:
    """A started span, ended by its ``with`` block; records an escaping exception as an error."""

    __slots__ = ("_cm", "span")

    def __init__(self, cm: contextlib.AbstractContextManager[Span]) -> None:
        self._cm = cm
        self.span: Span | None = None

    def __enter__(self) -> _Span:
        self.span = self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[1] is not None and self.span is not None:
            self.span.set_attribute("tidings.outcome", "error")
        self._cm.__exit__(*exc)

    def appended(self, result: AppendResult) -> None:
        """Record where the append landed."""
        assert self.span is not None
        self.span.set_attribute("tidings.stream.version", result.version)
        self.span.set_attribute("tidings.position", result.position)

    def set(self, key: str, value: str | int) -> None:
        """Set one attribute."""
        assert self.span is not None
        self.span.set_attribute(key, value)


def _parent_context(metadata: Mapping[str, Any]) -> Any:
    """The OpenTelemetry context whose parent is the span named by ``metadata``'s traceparent,
    or None (the current context) when it has none that parses."""
    traced = parse_traceparent(metadata.get(TRACEPARENT))
    if traced is None:
        return None
    state = metadata.get(TRACESTATE)
    context = _otel.SpanContext(
        traced.trace_id,
        traced.span_id,
        is_remote=True,
        trace_flags=_otel.TraceFlags(traced.flags & 0xFF),
        trace_state=_otel.TraceState.from_header([state]) if isinstance(state, str) and state else None,
    )
    return _otel.set_span_in_context(_otel.NonRecordingSpan(context))


def _links(envelopes: Sequence[RecordedEvent]) -> list[Any]:
    links = []
    for envelope in envelopes:
        parent = _parent_context(envelope.metadata)
        if parent is not None:
            links.append(_otel.Link(_otel.get_current_span(parent).get_span_context()))
    return links


def append_span(store_url: str, stream_id: str, count: int) -> _Span | _NoSpan:
    """The ``tidings.append`` span of one append (does nothing while spans are off)."""
    tracer = _live_tracer()
    if tracer is None:
        return _NO_SPAN
    return _Span(
        tracer.start_as_current_span(
            "tidings.append",
            kind=_otel.SpanKind.PRODUCER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "create",
                "messaging.operation.name": "append",
                "messaging.destination.name": stream_id,
                "messaging.batch.message_count": count,
                "tidings.store": store_url,
            },
            record_exception=True,
        )
    )


def publish_span(service: str, destination: str, envelopes: Sequence[RecordedEvent]) -> _Span | _NoSpan:
    """The ``tidings.publish`` span of one bus publish by ``service``'s relay to ``destination``,
    linked to the creation context (``traceparent``) of each message."""
    tracer = _live_tracer()
    if tracer is None:
        return _NO_SPAN
    return _Span(
        tracer.start_as_current_span(
            "tidings.publish",
            kind=_otel.SpanKind.CLIENT,
            links=_links(envelopes),
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.destination.name": destination,
                "messaging.batch.message_count": len(envelopes),
                "tidings.service": service,
                "tidings.position": max((e.position for e in envelopes), default=0),
            },
            record_exception=True,
        )
    )


def handle_span(recorded: RecordedEvent, group: str, attempt: int) -> _Span | _NoSpan:
    """The ``tidings.handle`` span of one handler call, the child of the event's ``traceparent``
    (or of the current span, if the event has none). ``tidings.outcome`` is ``handled`` or
    ``error`` (the exception is recorded); a retry is a later span with a higher ``tidings.attempt``."""
    tracer = _live_tracer()
    if tracer is None:
        return _NO_SPAN
    attributes: dict[str, str | int] = {
        "messaging.system": SYSTEM,
        "messaging.operation.type": "process",
        "messaging.operation.name": "handle",
        "messaging.destination.name": recorded.stream_id,
        "messaging.consumer.group.name": group,
        "messaging.message.id": str(recorded.event_id),
        "tidings.event_type": recorded.event_type,
        "tidings.attempt": attempt,
        "tidings.outcome": "handled",
    }
    if recorded.position:  # 0: a message from the bus, not in this store's log
        attributes["tidings.position"] = recorded.position
    source = recorded.metadata.get("source")
    if isinstance(source, str):
        attributes["tidings.source"] = source
    return _Span(
        tracer.start_as_current_span(
            "tidings.handle",
            context=_parent_context(recorded.metadata),
            kind=_otel.SpanKind.CONSUMER,
            attributes=attributes,
            record_exception=True,
        )
    )


def projection_span(group: str, events: Sequence[RecordedEvent]) -> _Span | _NoSpan:
    """The ``tidings.projection`` span of one projection batch, linked to each event's context
    (none for a batch without events: the runner only moved past events of other types)."""
    tracer = _live_tracer()
    if tracer is None or not events:
        return _NO_SPAN
    return _Span(
        tracer.start_as_current_span(
            "tidings.projection",
            kind=_otel.SpanKind.CONSUMER,
            links=_links(events),
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "project",
                "messaging.consumer.group.name": group,
                "messaging.batch.message_count": len(events),
                "tidings.position": events[-1].position if events else 0,
                "tidings.outcome": "handled",
            },
            record_exception=True,
        )
    )


def dead_lettered(recorded: RecordedEvent, group: str, attempts: int, error: BaseException | None) -> None:
    """Record a ``tidings.dead_letter`` span: ``group`` parked the event after ``attempts`` attempts
    (a child of the event's ``traceparent``, like its ``tidings.handle`` spans)."""
    tracer = _live_tracer()
    if tracer is None:
        return
    attributes: dict[str, str | int] = {
        "messaging.system": SYSTEM,
        "messaging.consumer.group.name": group,
        "messaging.message.id": str(recorded.event_id),
        "tidings.event_type": recorded.event_type,
        "tidings.attempt": attempts,
        "tidings.outcome": "dead_letter",
    }
    if recorded.position:
        attributes["tidings.position"] = recorded.position
    span = tracer.start_span(
        "tidings.dead_letter", context=_parent_context(recorded.metadata), attributes=attributes
    )
    if error is not None:
        span.record_exception(error)
        span.set_status(_otel.Status(_otel.StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


def saga_step_span(saga: str, saga_id: str, event_type: str) -> _Span | _NoSpan:
    """The ``tidings.saga.step`` span of a saga reacting to one event (a child of the current,
    ``tidings.handle``, span). The runner adds ``tidings.saga.step`` and ``tidings.saga.status``."""
    tracer = _live_tracer()
    if tracer is None:
        return _NO_SPAN
    return _Span(
        tracer.start_as_current_span(
            "tidings.saga.step",
            attributes={"tidings.saga": saga, "tidings.saga.id": saga_id, "tidings.event_type": event_type},
            record_exception=True,
        )
    )


if _otel is not None:
    enable()
