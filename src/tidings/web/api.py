"""The console's JSON API under ``/api``: read endpoints for everyone, actions behind the token.

Every read is also a plain ``async`` function taking the :class:`~tidings.web.app.Console`, so the
pages render exactly what the API returns. Reads change nothing; an unknown stream, event, dead
letter or saga raises :class:`~tidings.web.app.NotFound` (404).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from pydantic import StringConstraints

from tidings.causal import CausalTrace, build_trace
from tidings.errors import InvalidArgument, ProjectionError, TidingsError, UnsupportedOperation, is_transient
from tidings.processing.projections import projection_status, rebuild_projection
from tidings.processing.status import group_status
from tidings.sagas.queries import list_sagas, saga_history, saga_state
from tidings.store.append import MAX_STREAM_ID_LENGTH
from tidings.store.base import MAX_POSITION
from tidings.store.tracking import DeadLetter, SQLStore, TrackingStore
from tidings.web.app import Conflict, Console, NotFound, console_of
from tidings.web.auth import ACTION_RESPONSES, require_token
from tidings.web.queries import (
    caused_by,
    event_at,
    event_out,
    find_event,
    metadata_of,
    parse_event_id,
    read_stream_stored,
)
from tidings.web.schemas import (
    ActionResult,
    ConsoleInfo,
    DeadLetterDetail,
    DeadLetterOut,
    ErrorOut,
    EventDetail,
    EventOut,
    EventPage,
    EventRef,
    GroupOut,
    ProjectionOut,
    SagaDetail,
    SagaOut,
    SagaState,
    StreamDetail,
    StreamOut,
    StreamPage,
    TraceOut,
)

__all__ = [
    "dead_letter_detail",
    "dead_letters",
    "event_detail",
    "events",
    "groups",
    "info",
    "projections",
    "router",
    "saga_detail",
    "sagas",
    "stream_detail",
    "streams",
    "trace",
]

router = APIRouter(prefix="/api", tags=["console"])

ConsoleDep = Annotated[Console, Depends(console_of)]
NOT_FOUND: dict[int | str, dict[str, object]] = {404: {"model": ErrorOut, "description": "Not found."}}
Limit = Annotated[int, Query(ge=1, le=1000, description="At most this many items.")]
TEXT = r"^[^\x00]*$"
"""What the stores can hold in a name: any text without NUL (and at most 512 characters)."""
NAME = r"^[^\x00]+$"
MAX_TEXT = MAX_STREAM_ID_LENGTH
MAX_TRACE = 10_000
"""The most events a console trace gathers: a trace is built in the request, so its size is capped."""


# -- reads, shared with the pages ---------------------------------------------------------------------


async def info(console: Console) -> ConsoleInfo:
    store = console.store
    return ConsoleInfo(
        store=store.safe_url,
        sources=list(console.sources),
        head=await store.head(),
        actions_enabled=console.actions_enabled,
        service=None if console.service is None else console.service.name,
        tracking=isinstance(store, TrackingStore),
        sql=isinstance(store, SQLStore),
    )


async def streams(console: Console, prefix: str | None, after: str | None, limit: int) -> StreamPage:
    """Streams ordered by id (with ids starting with ``prefix``), after the id ``after``."""
    found: list[StreamOut] = []
    more = False
    async for stream in console.store.streams(prefix=prefix or None):
        if after is not None and stream.stream_id <= after:
            continue
        if len(found) == limit:
            more = True
            break
        found.append(StreamOut.of(stream))
    return StreamPage(streams=found, next_after=found[-1].stream_id if more else None)


async def stream_detail(console: Console, stream_id: str, after: int, limit: int) -> StreamDetail:
    store = console.store
    version = await store.stream_version(stream_id)
    if version == 0:
        raise NotFound(f"no stream {stream_id!r} in this store")
    page = await read_stream_stored(store, stream_id, after=after, limit=limit)
    found = [event_out(store, s) for s in page]
    last = found[-1] if found else None
    # The stream's last event's position, for the stream's summary line.
    position = last.position if last is not None and last.version == version else 0
    if position == 0:
        for newest in await read_stream_stored(store, stream_id, backwards=True, limit=1):
            position = newest.position
    return StreamDetail(
        stream=StreamOut(stream_id=stream_id, version=version, position=position),
        events=found,
        next_after=last.version if last is not None and last.version < version else None,
    )


async def events(
    console: Console, types: list[str] | None, prefix: str | None, after: int | None, limit: int
) -> EventPage:
    """A page of the global log, optionally of some types and streams. Without ``after``: the
    last ``limit`` events when unfiltered, else the first matches."""
    store = console.store
    head = await store.head()
    if after is None:
        after = max(0, head - limit) if not types and not prefix else 0
    found = [
        event_out(store, s)
        async for s in store.read_all_stored(
            after=after, event_types=types or None, stream_prefix=prefix or None, limit=limit
        )
    ]
    next_after = found[-1].position if len(found) == limit else None
    return EventPage(events=found, head=head, next_after=next_after)


async def event_detail(console: Console, ref: str, source: str | None = None) -> EventDetail:
    """The event named by ``ref`` (its id, or its global position) with its causal neighbours."""
    store = console.source(source)
    recorded = None
    if ref.isascii() and ref.isdigit():  # "²".isdigit() is true, but int() refuses it
        recorded = await event_at(store, int(ref)) if int(ref) <= MAX_POSITION else None
    else:
        event_id = parse_event_id(ref)
        if event_id is None:
            raise NotFound(f"{ref!r} is neither an event id (a UUID) nor a position")
        recorded = await find_event(store, event_id)
    if recorded is None:
        raise NotFound(f"no event {ref!r} in this store")
    metadata = metadata_of(recorded)
    causation = metadata.get("causation_id")
    cause = None
    if causation is not None and (cause_id := parse_event_id(str(causation))) is not None:
        cause = await find_event(store, cause_id)
    caused, complete = await caused_by(store, recorded)
    correlation = metadata.get("correlation_id")
    return EventDetail(
        event=event_out(store, recorded),
        causation_id=None if causation is None else str(causation),
        correlation_id=None if correlation is None else str(correlation),
        cause=None if cause is None else EventRef.envelope(cause),
        caused=[EventRef.envelope(e) for e in caused],
        caused_complete=complete,
    )


def _tracking(console: Console) -> TrackingStore:
    store = console.store
    if not isinstance(store, TrackingStore):
        raise Conflict(f"the store {store.safe_url} keeps no subscription records")
    return store


async def groups(console: Console) -> list[GroupOut]:
    return [GroupOut.of(s) for s in await group_status(_tracking(console))]


async def projections(console: Console) -> list[ProjectionOut]:
    return [ProjectionOut.of(s) for s in await projection_status(console.store)]


async def dead_letters(
    console: Console, group: str | None, after: int = 0, limit: int = 100
) -> list[DeadLetterOut]:
    """A page of the parked events, oldest first: those with an id above ``after``."""
    found = await _tracking(console).dead_letters(group or None, after_id=after, limit=limit)
    return [DeadLetterOut.of(d) for d in found]


async def _dead_letter(console: Console, id: int) -> DeadLetter:
    dead = await _tracking(console).dead_letter(id)
    if dead is None:
        raise NotFound(f"no dead letter with id {id}")
    return dead


async def dead_letter_detail(console: Console, id: int) -> DeadLetterDetail:
    dead = await _dead_letter(console, id)
    recorded = await event_at(console.store, dead.position)
    if recorded is not None and recorded.event_id != dead.event_id:
        recorded = None
    return DeadLetterDetail(
        **DeadLetterOut.of(dead).model_dump(),
        traceback=dead.traceback,
        event=None if recorded is None else event_out(console.store, recorded),
    )


async def sagas(console: Console, name: str | None, status: str | None, limit: int) -> list[SagaOut]:
    store = console.store
    if not isinstance(store, SQLStore):
        return []  # sagas keep their index in SQL: a store without SQL has run none
    found = await list_sagas(store, name=name or None, status=status or None, limit=limit)
    return [SagaOut.of(s) for s in found]


async def saga_detail(console: Console, saga_id: str) -> SagaDetail:
    store = console.store
    history = await saga_history(store, saga_id)
    if not history:
        raise NotFound(f"no saga {saga_id!r} in this store")
    state = await saga_state(store, saga_id)
    return SagaDetail(saga_id=saga_id, state=SagaState.of(state), history=[EventOut.of(e) for e in history])


async def trace(console: Console, ref: str, limit: int) -> CausalTrace:
    """The causal trace of ``ref`` (an event id, a correlation id or a stream id) across every
    source; :class:`~tidings.causal.TraceNotFound` (404) if no source knows it."""
    return await build_trace(console.sources, ref, limit=limit)


# -- routes -------------------------------------------------------------------------------------------


@router.get("/info", response_model=ConsoleInfo, summary="What the console is looking at")
async def get_info(console: ConsoleDep) -> ConsoleInfo:
    return await info(console)


@router.get("/streams", response_model=StreamPage, summary="Streams, by id")
async def get_streams(
    console: ConsoleDep,
    prefix: Annotated[
        str | None,
        Query(pattern=TEXT, max_length=MAX_TEXT, description="Only streams whose id starts with this."),
    ] = None,
    after: Annotated[
        str | None,
        Query(pattern=TEXT, max_length=MAX_TEXT, description="Only streams whose id sorts after this."),
    ] = None,
    limit: Limit = 100,
) -> StreamPage:
    return await streams(console, prefix, after, limit)


@router.get(
    "/streams/{stream_id:path}",
    response_model=StreamDetail,
    responses=NOT_FOUND,
    summary="One stream's events",
)
async def get_stream(
    console: ConsoleDep,
    stream_id: Annotated[str, Path(pattern=NAME, max_length=MAX_TEXT, description="The stream's id.")],
    after: Annotated[int, Query(ge=0, le=MAX_POSITION, description="Only events after this version.")] = 0,
    limit: Limit = 100,
) -> StreamDetail:
    return await stream_detail(console, stream_id, after, limit)


@router.get("/events", response_model=EventPage, summary="Search the global log")
async def get_events(
    console: ConsoleDep,
    type: Annotated[
        list[Annotated[str, StringConstraints(pattern=TEXT, max_length=MAX_TEXT)]] | None,
        Query(description="Only events of these types (repeatable)."),
    ] = None,
    prefix: Annotated[
        str | None,
        Query(pattern=TEXT, max_length=MAX_TEXT, description="Only events of streams starting with this."),
    ] = None,
    after: Annotated[
        int | None,
        Query(ge=0, le=MAX_POSITION, description="Start after this position (default: the latest page)."),
    ] = None,
    limit: Limit = 50,
) -> EventPage:
    return await events(console, type, prefix, after, limit)


@router.get(
    "/events/{ref}",
    response_model=EventDetail,
    responses=NOT_FOUND,
    summary="One event (by id or position), its cause and what it caused",
)
async def get_event(
    console: ConsoleDep,
    ref: Annotated[
        str, Path(pattern=NAME, max_length=MAX_TEXT, description="The event's id, or its global position.")
    ],
    source: Annotated[
        str | None, Query(pattern=TEXT, max_length=MAX_TEXT, description="The named store to look in.")
    ] = None,
) -> EventDetail:
    return await event_detail(console, ref, source)


@router.get("/groups", response_model=list[GroupOut], summary="Subscription groups: lag and liveness")
async def get_groups(console: ConsoleDep) -> list[GroupOut]:
    return await groups(console)


@router.get("/projections", response_model=list[ProjectionOut], summary="Projections and their generations")
async def get_projections(console: ConsoleDep) -> list[ProjectionOut]:
    return await projections(console)


@router.get("/dead-letters", response_model=list[DeadLetterOut], summary="Parked events, oldest first")
async def get_dead_letters(
    console: ConsoleDep,
    group: Annotated[
        str | None, Query(pattern=TEXT, max_length=MAX_TEXT, description="Only this subscription group.")
    ] = None,
    after: Annotated[
        int,
        Query(ge=0, le=MAX_POSITION, description="Only letters with an id above this (the last of a page)."),
    ] = 0,
    limit: Limit = 100,
) -> list[DeadLetterOut]:
    return await dead_letters(console, group, after, limit)


@router.get(
    "/dead-letters/{id}",
    response_model=DeadLetterDetail,
    responses=NOT_FOUND,
    summary="One parked event with its error, traceback and event",
)
async def get_dead_letter(
    console: ConsoleDep, id: Annotated[int, Path(ge=1, le=MAX_POSITION)]
) -> DeadLetterDetail:
    return await dead_letter_detail(console, id)


@router.get("/sagas", response_model=list[SagaOut], summary="Saga instances, most recently changed first")
async def get_sagas(
    console: ConsoleDep,
    name: Annotated[
        str | None, Query(pattern=TEXT, max_length=MAX_TEXT, description="Only instances of this saga.")
    ] = None,
    status: Annotated[
        str | None,
        Query(
            description="Only instances in this status.",
            pattern="^(running|compensating|completed|compensated|failed)$",
        ),
    ] = None,
    limit: Limit = 100,
) -> list[SagaOut]:
    return await sagas(console, name, status, limit)


@router.get(
    "/sagas/{saga_id:path}",
    response_model=SagaDetail,
    responses=NOT_FOUND,
    summary="One saga instance: state and history",
)
async def get_saga(
    console: ConsoleDep, saga_id: Annotated[str, Path(pattern=NAME, max_length=MAX_TEXT)]
) -> SagaDetail:
    return await saga_detail(console, saga_id)


@router.get(
    "/trace/{ref:path}",
    response_model=TraceOut,
    responses=NOT_FOUND,
    summary="The causal trace of an event, conversation or stream across every source",
)
async def get_trace(
    console: ConsoleDep,
    ref: Annotated[
        str,
        Path(
            pattern=r"^[^\x00]*[^\x00\s][^\x00]*$",
            max_length=MAX_TEXT,
            description="An event id, a correlation id or a stream id.",
        ),
    ],
    limit: Annotated[int, Query(ge=1, le=MAX_TRACE, description="At most this many events.")] = MAX_TRACE,
) -> TraceOut:
    return TraceOut.model_validate((await trace(console, ref, limit)).to_dict())


# -- actions ------------------------------------------------------------------------------------------

ACTION = {**ACTION_RESPONSES, **NOT_FOUND, 409: {"model": ErrorOut, "description": "Not possible here."}}


@router.post(
    "/dead-letters/{id}/retry",
    response_model=ActionResult,
    responses=ACTION,
    dependencies=[Depends(require_token)],
    summary="Process a parked event again with its group's handler",
)
async def retry_dead_letter(
    console: ConsoleDep, id: Annotated[int, Path(ge=1, le=MAX_POSITION)]
) -> ActionResult:
    """Runs the group's own handler on the event once more (as ``tidings dlq retry`` does); the
    letter is removed with the handler's effects if that succeeds, else it stays parked with the
    new error. Needs the service (``tidings serve --app``)."""
    service = console.service
    dead = await _dead_letter(console, id)
    if service is None:
        raise Conflict(
            "retrying needs the service's handlers: start 'tidings serve' with --app MODULE:SERVICE"
        )
    if not service.runs_group(dead.group):  # a bus consumer's letters count: refused below, with why
        raise Conflict(
            f"dead letter {id} belongs to group {dead.group!r}, which service {service.name!r} does not run"
        )
    try:
        subscription = service.subscription(dead.group)
    except UnsupportedOperation as exc:
        raise Conflict(f"dead letter {id} cannot be retried: {exc}") from exc
    try:
        if await subscription.retry_dead_letter(dead):
            return ActionResult(outcome="processed", detail=f"dead letter {id} processed and removed")
    except TidingsError as exc:
        if is_transient(exc):
            raise  # an outage: a 503, try again later
        if await _tracking(console).dead_letter(id) is None:
            # Another retry (or a discard) took it while this one ran; this one committed nothing.
            raise NotFound(f"dead letter {id} is gone: it was retried or discarded concurrently") from exc
        if isinstance(exc, InvalidArgument):
            # Not retried at all (its event is gone, or it is not this group's): the handler never ran.
            raise Conflict(f"dead letter {id} cannot be retried: {exc}") from exc
        return ActionResult(
            outcome="failed",
            detail=f"dead letter {id} could not be retried; it stays parked",
            error=f"{type(exc).__name__}: {exc}",
        )
    # The handler ran and failed: the letter now holds its new error.
    again = await _tracking(console).dead_letter(id)
    if again is None:
        raise NotFound(f"dead letter {id} is gone: it was retried or discarded concurrently")
    return ActionResult(
        outcome="failed",
        detail=f"dead letter {id} failed again; it stays parked",
        error=again.error,
    )


@router.post(
    "/dead-letters/{id}/discard",
    response_model=ActionResult,
    responses=ACTION,
    dependencies=[Depends(require_token)],
    summary="Delete a parked event without processing it",
)
async def discard_dead_letter(
    console: ConsoleDep, id: Annotated[int, Path(ge=1, le=MAX_POSITION)]
) -> ActionResult:
    if not await _tracking(console).discard_dead_letter(id):
        raise NotFound(f"no dead letter with id {id}")
    return ActionResult(outcome="discarded", detail=f"dead letter {id} discarded")


@router.post(
    "/projections/{name}/rebuild",
    response_model=ActionResult,
    responses=ACTION,
    dependencies=[Depends(require_token)],
    summary="Rebuild a projection by replay (blue/green)",
)
async def rebuild(console: ConsoleDep, name: str) -> ActionResult:
    """Answers when the new generation serves. Needs the service (``tidings serve --app``)."""
    service = console.service
    if service is None:
        raise Conflict("rebuilding needs the service's projections: start 'tidings serve' with --app")
    projection = service.projections.get(name)
    if projection is None:
        known = ", ".join(sorted(service.projections)) or "none"
        raise NotFound(f"service {service.name!r} has no projection {name!r} (it has: {known})")
    try:
        generation = await rebuild_projection(console.store, projection)
    except ProjectionError as exc:
        # A rebuild under way, or one that was interrupted and left its mark: the console never
        # forces (that would drop what a live rebuild has built), the command line can.
        raise Conflict(
            f"projection {name} cannot be rebuilt now: {exc}. If no rebuild is running any more "
            f"(one was interrupted), run 'tidings projections rebuild {name} --app MODULE:SERVICE --force'"
        ) from exc
    return ActionResult(
        outcome="rebuilt",
        detail=f"projection {name} rebuilt; generation {generation} is now serving",
        generation=generation,
    )
