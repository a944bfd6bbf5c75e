"""The console's HTML pages, rendered on the server from the same reads as the API.

No page needs JavaScript to show its data; ``static/console.js`` only adds the live tail (an
``EventSource`` on ``/api/tail``) and the action buttons (``fetch`` with the bearer token the
user typed, kept in the tab's ``sessionStorage``).
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from tidings.store.base import MAX_POSITION
from tidings.web import api, svg
from tidings.web.app import Console, console_of

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

ConsoleDep = Annotated[Console, Depends(console_of)]
Limit = Annotated[int, Query(ge=1, le=1000)]


def render(request: Request, template: str, **context: Any) -> HTMLResponse:
    """The page ``template`` with ``context``, plus what every page shows (the console)."""
    templates: Jinja2Templates = request.app.state.templates
    context.setdefault("console", console_of(request))
    return templates.TemplateResponse(request, template, context)


def event_url(event_id: str, source: str | None = None) -> str:
    return f"/events/{quote(event_id, safe='')}" + ("" if source is None else f"?source={quote(source)}")


@router.get("/")
async def home() -> RedirectResponse:
    return RedirectResponse("/streams", status_code=303)


@router.get("/streams")
async def streams_page(
    request: Request,
    console: ConsoleDep,
    prefix: str | None = None,
    after: str | None = None,
    limit: Limit = 100,
) -> HTMLResponse:
    page = await api.streams(console, prefix, after, limit)
    return render(request, "streams.html", page=page, prefix=prefix or "", info=await api.info(console))


@router.get("/streams/{stream_id:path}")
async def stream_page(
    request: Request,
    console: ConsoleDep,
    stream_id: Annotated[str, Path()],
    after: Annotated[int, Query(ge=0, le=MAX_POSITION)] = 0,
    limit: Limit = 100,
) -> HTMLResponse:
    detail = await api.stream_detail(console, stream_id, after, limit)
    return render(request, "stream.html", detail=detail)


@router.get("/events")
async def events_page(
    request: Request,
    console: ConsoleDep,
    type: Annotated[list[str] | None, Query()] = None,
    prefix: str | None = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_POSITION)] = None,
    limit: Limit = 50,
) -> HTMLResponse:
    # The form's one field may hold several types, separated by spaces (no type name has one).
    types = [name for field in type or () for name in field.split()]
    page = await api.events(console, types or None, prefix, after, limit)
    return render(request, "events.html", page=page, types=" ".join(types), prefix=prefix or "")


@router.get("/events/{ref}")
async def event_page(
    request: Request, console: ConsoleDep, ref: Annotated[str, Path()], source: str | None = None
) -> HTMLResponse:
    detail = await api.event_detail(console, ref, source)
    return render(request, "event.html", detail=detail, source=source)


@router.get("/tail")
async def tail_page(request: Request, console: ConsoleDep, limit: Limit = 20) -> HTMLResponse:
    page = await api.events(console, None, None, None, limit)
    return render(request, "tail.html", page=page)


@router.get("/groups")
async def groups_page(request: Request, console: ConsoleDep) -> HTMLResponse:
    return render(
        request,
        "groups.html",
        groups=await api.groups(console),
        projections=await api.projections(console),
    )


@router.get("/dead-letters")
async def dead_letters_page(request: Request, console: ConsoleDep, group: str | None = None) -> HTMLResponse:
    return render(request, "dead_letters.html", letters=await api.dead_letters(console, group), group=group)


@router.get("/dead-letters/{id}")
async def dead_letter_page(
    request: Request, console: ConsoleDep, id: Annotated[int, Path(ge=1, le=MAX_POSITION)]
) -> HTMLResponse:
    return render(request, "dead_letter.html", dead=await api.dead_letter_detail(console, id))


@router.get("/sagas")
async def sagas_page(
    request: Request,
    console: ConsoleDep,
    name: str | None = None,
    status: Annotated[
        str | None, Query(pattern="^(|running|compensating|completed|compensated|failed)$")
    ] = None,
    limit: Limit = 100,
) -> HTMLResponse:
    found = await api.sagas(console, name, status or None, limit)
    return render(request, "sagas.html", sagas=found, name=name or "", status=status or "")


@router.get("/sagas/{saga_id:path}")
async def saga_page(request: Request, console: ConsoleDep, saga_id: str) -> HTMLResponse:
    return render(request, "saga.html", saga=await api.saga_detail(console, saga_id))


@router.get("/trace", response_model=None)
async def trace_form(request: Request, ref: str | None = None) -> HTMLResponse | RedirectResponse:
    if ref and ref.strip():
        return RedirectResponse(f"/trace/{quote(ref.strip(), safe='')}", status_code=303)
    return render(request, "trace.html", trace=None, diagram=None, ref="")


@router.get("/trace/{ref:path}")
async def trace_page(
    request: Request,
    console: ConsoleDep,
    ref: Annotated[str, Path()],
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> HTMLResponse:
    found = await api.trace(console, ref, limit)

    def link(node: svg.DiagramNode) -> str:
        source = getattr(node, "source", "") or None
        return event_url(node.event_id, source if source in console.sources else None)

    diagram = svg.sequence_svg(found.roots, link=link, title=f"causal trace of {ref}")
    return render(request, "trace.html", trace=found, diagram=diagram, ref=ref)
