"""The live tail: new events of the global log as server-sent events (``GET /api/tail``).

Each event is one SSE message ``event: tidings-event``, ``id: POSITION``, ``data:`` its JSON (the
API's :class:`~tidings.web.schemas.EventOut`). The stream starts after ``?after=N`` (default: the
head, i.e. only what is appended from now on) or after the ``Last-Event-ID`` a reconnecting
browser sends, so a dropped connection resumes without a gap or a duplicate. It waits with
:meth:`~tidings.EventStore.wait_for_append` (woken at once by in-process appends, by the backend's
change detection otherwise) and sends a comment line every ``KEEPALIVE`` seconds, which is also
how a closed connection is noticed.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import StreamingResponse

from tidings.errors import InvalidArgument, StoreClosed, StoreUnavailable
from tidings.store.base import MAX_POSITION
from tidings.web.app import Console, console_of
from tidings.web.queries import event_out

__all__ = ["KEEPALIVE", "router", "tail"]

router = APIRouter(prefix="/api")

KEEPALIVE = 15.0
"""Seconds between keep-alive comments when nothing is appended."""

BATCH = 200
"""Events read per round (a burst is sent in rounds of this size)."""


async def tail(console: Console, after: int, *, keepalive: float = KEEPALIVE) -> AsyncIterator[str]:
    """The SSE text of every event after position ``after``, until the console stops.

    The stream ends (a complete response; the browser reconnects with ``Last-Event-ID`` and
    resumes) when :attr:`Console.stopping` is set, and when the store is closed or unreachable,
    rather than breaking off mid-message.
    """
    store = console.store
    position = after
    yield "retry: 2000\n\n"
    stopping = asyncio.ensure_future(console.stopping.wait())
    try:
        while not console.stopping.is_set():
            waiting = asyncio.ensure_future(store.wait_for_append(position, timeout=keepalive))
            await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                waiting.cancel()
                break
            head = waiting.result()
            if head <= position:
                yield ": keep-alive\n\n"
                continue
            async for stored in store.read_all_stored(after=position, limit=BATCH):
                # Decoded one by one: an event that no longer decodes is sent raw, marked, rather
                # than failing the stream (which the browser would reconnect to forever).
                body = event_out(store, stored).model_dump_json()
                position = stored.position
                yield f"event: tidings-event\nid: {position}\ndata: {body}\n\n"
    except (StoreClosed, StoreUnavailable):
        return  # the reconnecting browser resumes after the last id it saw
    finally:
        stopping.cancel()


@router.get("/tail", include_in_schema=False)
async def get_tail(
    console: Annotated[Console, Depends(console_of)],
    after: Annotated[int | None, Query(ge=0, le=MAX_POSITION)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    if last_event_id is not None:
        # Checked here: once the stream has started, an error can no longer be answered.
        if not re.fullmatch(r"[0-9]{1,19}", last_event_id) or int(last_event_id) > MAX_POSITION:
            raise InvalidArgument(f"Last-Event-ID must be a log position, got {last_event_id!r}")
        start = int(last_event_id)
    elif after is not None:
        start = after
    else:
        start = await console.store.head()
    return StreamingResponse(
        tail(console, start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
