"""The console API's response bodies, as pydantic models.

FastAPI validates every response against these models and generates the OpenAPI description
(``/openapi.json``) from the same classes, so the published schema cannot drift from what the
API returns. The constructors ``*.of(...)`` turn the library's records into them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from tidings.events import RawEvent, RecordedEvent
from tidings.processing.projections import ProjectionStatus
from tidings.processing.status import GroupStatus
from tidings.sagas.queries import SagaSummary
from tidings.sagas.state import SagaInstance
from tidings.store.base import StoredEvent, StreamInfo
from tidings.store.tracking import DeadLetter

__all__ = [
    "ActionResult",
    "ConsoleInfo",
    "DeadLetterDetail",
    "DeadLetterOut",
    "DeadLetteredOut",
    "ErrorOut",
    "EventDetail",
    "EventOut",
    "EventPage",
    "EventRef",
    "GroupOut",
    "ProjectionOut",
    "SagaDetail",
    "SagaOut",
    "StreamDetail",
    "StreamOut",
    "StreamPage",
    "TraceNodeOut",
    "TraceOut",
]


def event_data(recorded: RecordedEvent) -> dict[str, Any]:
    """The event's data as JSON-ready values, whether it was decoded or read raw."""
    event = recorded.event
    if isinstance(event, RawEvent):
        return dict(event.data)
    return event.model_dump(mode="json")


class ErrorOut(BaseModel):
    """Every error response: what went wrong, in one sentence."""

    detail: str


class StreamOut(BaseModel):
    """A stream: its id, version (its last event's) and its last event's global position."""

    stream_id: str
    version: int
    position: int

    @classmethod
    def of(cls, info: StreamInfo) -> StreamOut:
        return cls(stream_id=info.stream_id, version=info.version, position=info.position)


class StreamPage(BaseModel):
    """Streams ordered by id; ``next_after`` is the ``after`` of the next page (None: last page)."""

    streams: list[StreamOut]
    next_after: str | None


class EventRef(BaseModel):
    """Where an event is: enough to name and link it."""

    event_id: str
    event_type: str
    stream_id: str
    version: int
    position: int

    @classmethod
    def of(cls, recorded: RecordedEvent) -> EventRef:
        return cls.envelope(recorded)

    @classmethod
    def envelope(cls, recorded: RecordedEvent | StoredEvent) -> EventRef:
        """The reference of a decoded or a stored event (only the envelope is read)."""
        return EventRef(
            event_id=str(recorded.event_id),
            event_type=recorded.event_type,
            stream_id=recorded.stream_id,
            version=recorded.version,
            position=recorded.position,
        )


class EventOut(EventRef):
    """An event in its envelope: the same keys as ``tidings events --json``."""

    schema_version: int
    timestamp: datetime
    data: dict[str, Any]
    metadata: dict[str, Any]
    undecodable: str | None = None
    """Why the stored event no longer decodes (``data`` is then its raw JSON); None when it does."""

    @classmethod
    def of(cls, recorded: RecordedEvent) -> EventOut:
        return cls(
            **EventRef.of(recorded).model_dump(),
            schema_version=recorded.schema_version,
            timestamp=recorded.timestamp,
            data=event_data(recorded),
            metadata=dict(recorded.metadata),
        )


class EventPage(BaseModel):
    """Events in log (or stream) order; ``next_after`` continues the listing (None: no more yet)."""

    events: list[EventOut]
    head: int
    next_after: int | None


class StreamDetail(BaseModel):
    """One stream and a page of its events, in version order."""

    stream: StreamOut
    events: list[EventOut]
    next_after: int | None


class EventDetail(BaseModel):
    """One event with its causal neighbours: the event it was caused by (``cause``, None if it
    has no ``causation_id`` or the cause is not in this store) and the events it caused.

    The events it caused are looked for in its conversation; ``caused_complete`` is false when
    the conversation was too long to read whole (see :data:`tidings.web.queries.CONVERSATION_LIMIT`).
    """

    event: EventOut
    causation_id: str | None
    correlation_id: str | None
    cause: EventRef | None
    caused: list[EventRef]
    caused_complete: bool


class GroupOut(BaseModel):
    """A subscription group: its checkpoint, lag, liveness and parked events."""

    group: str
    checkpoint: int
    head: int
    lag: int
    state: str
    holder: str | None
    heartbeat_at: datetime | None
    last_error: str | None
    dead_letters: int

    @classmethod
    def of(cls, s: GroupStatus) -> GroupOut:
        return cls(
            group=s.group,
            checkpoint=s.checkpoint,
            head=s.head,
            lag=s.lag,
            state=s.state,
            holder=s.holder,
            heartbeat_at=s.heartbeat_at,
            last_error=s.last_error,
            dead_letters=s.dead_letters,
        )


class ProjectionOut(BaseModel):
    """A projection: its serving generation, a rebuild under way, its lag and state."""

    name: str
    generation: int
    building: int | None
    checkpoint: int
    head: int
    lag: int
    state: str
    needs_rebuild: bool
    dead_letters: int
    holder: str | None
    heartbeat_at: datetime | None
    last_error: str | None

    @classmethod
    def of(cls, s: ProjectionStatus) -> ProjectionOut:
        return cls(
            name=s.name,
            generation=s.generation,
            building=s.building,
            checkpoint=s.checkpoint,
            head=s.head,
            lag=s.lag,
            state=s.state,
            needs_rebuild=s.needs_rebuild,
            dead_letters=s.dead_letters,
            holder=s.holder,
            heartbeat_at=s.heartbeat_at,
            last_error=s.last_error,
        )


class DeadLetterOut(BaseModel):
    """A parked event: the same keys as ``tidings dlq list --json``."""

    id: int
    group: str
    position: int
    event_id: str
    stream_id: str
    event_type: str
    attempts: int
    error: str
    failed_at: datetime

    @classmethod
    def of(cls, dead: DeadLetter) -> DeadLetterOut:
        return cls(
            id=dead.id,
            group=dead.group,
            position=dead.position,
            event_id=str(dead.event_id),
            stream_id=dead.stream_id,
            event_type=dead.event_type,
            attempts=dead.attempts,
            error=dead.error,
            failed_at=dead.failed_at,
        )


class DeadLetterDetail(DeadLetterOut):
    """A parked event with its traceback and the event itself (None if no longer in the log)."""

    traceback: str
    event: EventOut | None


class ActionResult(BaseModel):
    """What an action did. ``outcome`` is ``processed`` (a retried letter ran and was removed),
    ``failed`` (it failed again and stays parked, with ``error``), ``discarded`` or ``rebuilt``."""

    outcome: Literal["processed", "failed", "discarded", "rebuilt"]
    detail: str
    error: str | None = None
    generation: int | None = None


class SagaOut(BaseModel):
    """A saga instance as the saga index knows it."""

    saga_id: str
    name: str
    status: str
    step: str | None
    due_at: datetime | None
    updated_at: datetime
    reason: str | None

    @classmethod
    def of(cls, s: SagaSummary) -> SagaOut:
        return cls(
            saga_id=s.saga_id,
            name=s.name,
            status=s.status,
            step=s.step,
            due_at=s.due_at,
            updated_at=s.updated_at,
            reason=s.reason,
        )


class SagaState(BaseModel):
    """A saga instance's state: the replay of its stream."""

    saga: str
    key: str
    status: str
    step: str | None
    due_at: float | None
    done: list[str]
    reason: str | None
    data: dict[str, Any]
    version: int

    @classmethod
    def of(cls, s: SagaInstance) -> SagaState:
        return cls(
            saga=s.saga,
            key=s.key,
            status=s.status,
            step=s.step,
            due_at=s.due_at,
            done=list(s.done),
            reason=s.reason,
            data=dict(s.data),
            version=s.version,
        )


class SagaDetail(BaseModel):
    """One saga instance: its state and every transition of its stream, in order."""

    saga_id: str
    state: SagaState
    history: list[EventOut]


class ConsoleInfo(BaseModel):
    """What the console is looking at, and whether actions are enabled."""

    store: str
    sources: list[str]
    head: int
    actions_enabled: bool
    service: str | None
    tracking: bool
    sql: bool


class DeadLetteredOut(BaseModel):
    """A dead letter of a traced event."""

    group: str
    error: str
    attempts: int
    failed_at: datetime | None
    service: str | None
    dead_letter_id: int | None


class TraceNodeOut(BaseModel):
    """One event of a trace; ``parent`` and ``children`` are event ids (the tree is flat)."""

    event_id: str
    event_type: str
    stream_id: str
    version: int
    position: int
    timestamp: datetime
    service: str
    source: str
    correlation_id: str | None
    causation_id: str | None
    caused_by: str | None
    saga_id: str | None
    since_parent_ms: float | None
    compensation: bool
    dead_lettered: list[DeadLetteredOut]
    parent: str | None
    children: list[str]
    depth: int


class TraceOut(BaseModel):
    """A causal trace (:meth:`tidings.causal.CausalTrace.to_dict`): its nodes depth-first, a node
    before its children; ``roots`` are the ids of the events whose cause is not in the trace."""

    ref: str
    correlation_ids: list[str]
    sources: list[str]
    truncated: bool
    count: int
    services: list[str]
    roots: list[str]
    nodes: list[TraceNodeOut]
