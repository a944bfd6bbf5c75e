"""The console's ASGI application: :func:`create_app` wires the API, the pages and the live tail.

The application reads one store (the *default* store: every page but the causal trace) and may
know several named *sources* -- one store per service -- that the causal trace joins. It opens,
on startup, the stores that are not open yet and closes those on shutdown; stores handed over
open stay open (their owner closes them).

Errors: a library error for bad input (:class:`~tidings.InvalidArgument`) is a 422 whose body has
FastAPI's validation shape; an unknown stream, event, dead letter or saga is a 404 with
``{"detail": "..."}``; a store that is down is a 503. Pages render the same as an HTML page.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from tidings import __version__
from tidings.causal import TraceNotFound
from tidings.errors import InvalidArgument, StoreClosed, StoreUnavailable, TidingsError, is_transient
from tidings.service import Service
from tidings.store.base import EventStore

__all__ = ["Console", "create_app"]

HERE = Path(__file__).parent


@dataclasses.dataclass
class Console:
    """What the application serves: the default store, the named sources of the causal trace,
    the action token (None: actions disabled) and the service whose handlers retry dead letters
    and rebuild projections (None: those two actions are unavailable)."""

    store: EventStore
    sources: Mapping[str, EventStore]
    token: str | None = None
    service: Service | None = None
    stopping: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    """Set when the server is asked to stop: live tails end their responses (see
    :func:`~tidings.web.sse.tail`) instead of being cancelled mid-message."""

    @property
    def actions_enabled(self) -> bool:
        return self.token is not None

    def token_matches(self, given: str) -> bool:
        """Whether ``given`` is the configured token (compared in constant time)."""
        return self.token is not None and secrets.compare_digest(given.encode(), self.token.encode())

    def source(self, name: str | None) -> EventStore:
        """The store of source ``name`` (the default store for None); 404 if there is none."""
        if name is None:
            return self.store
        found = self.sources.get(name)
        if found is None:
            known = ", ".join(sorted(self.sources)) or "none"
            raise NotFound(f"no source {name!r} (known: {known})")
        return found


class NotFound(TidingsError):
    """What the request names does not exist (an HTTP 404)."""


class Conflict(TidingsError):
    """The request cannot be done in the console's configuration (an HTTP 409)."""


def console_of(request: Request) -> Console:
    """The request's :class:`Console` (a FastAPI dependency)."""
    console: Console = request.app.state.console
    return console


def create_app(
    store: EventStore,
    *,
    token: str | None = None,
    service: Service | None = None,
    sources: Mapping[str, EventStore] | None = None,
) -> FastAPI:
    """The console application on ``store``.

    ``token`` enables the actions (``POST`` endpoints) for requests carrying
    ``Authorization: Bearer TOKEN``; without one they answer 403. ``service`` (its store should be
    ``store``) lets the console retry dead letters and rebuild projections with its handlers.
    ``sources`` names the stores the causal trace joins (default: ``{"default": store}``).
    Raises :class:`~tidings.InvalidArgument` for an empty token.
    """
    if token is not None and not token.strip():
        raise InvalidArgument("the console token must not be empty")
    console = Console(store, dict(sources) if sources else {"default": store}, token, service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Only the stores that are not open yet are ours to open and close.
        ours = [s for s in {id(s): s for s in (store, *console.sources.values())}.values() if not s.is_open]
        try:
            if service is not None:
                await service.open()
            for each in ours:
                if not each.is_open:
                    await each.open()
            yield
        finally:
            if service is not None:
                await service.close()
            for each in ours:
                if each.is_open:
                    await each.close()

    app = FastAPI(
        title="tidings console",
        version=__version__,
        description="Read a tidings event store: streams, events, subscription groups, dead letters, "
        "sagas and causal traces. Actions need a bearer token.",
        lifespan=lifespan,
    )
    app.state.console = console
    app.state.templates = templates()
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    # Imported here: they import this module for Console and console_of.
    from tidings.web import api, pages, sse

    app.include_router(api.router)
    app.include_router(sse.router)
    app.include_router(pages.router)
    _errors(app)
    return app


def templates() -> Jinja2Templates:
    """The page templates, with the filters they use."""
    found = Jinja2Templates(directory=HERE / "templates")
    found.env.globals["version"] = __version__
    found.env.filters["when"] = _when
    # A stream, saga or correlation id as one path segment: "/" encoded too (Jinja's urlencode
    # keeps it), since an id may hold it ('tenant/7', even '../etc', which a browser would
    # resolve away).
    found.env.filters["segment"] = found.env.filters["pathpart"] = lambda value: quote(str(value), safe="")
    return found


def _when(value: Any) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api/") or request.url.path == "/openapi.json"


def error_response(request: Request, status: int, message: str) -> Response:
    """``{"detail": message}`` for the API, the error page for a page."""
    if _is_api(request):
        return JSONResponse({"detail": message}, status_code=status)
    return error_page(request, status, message)


def error_page(request: Request, status: int, message: str) -> HTMLResponse:
    page: Jinja2Templates = request.app.state.templates
    return page.TemplateResponse(
        request, "error.html", {"status": status, "message": message, "console": console_of(request)}, status
    )


def _errors(app: FastAPI) -> None:
    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound) -> Response:
        return error_response(request, 404, str(exc))

    @app.exception_handler(TraceNotFound)
    async def no_trace(request: Request, exc: TraceNotFound) -> Response:
        return error_response(request, 404, str(exc))

    @app.exception_handler(Conflict)
    async def conflict(request: Request, exc: Conflict) -> Response:
        return error_response(request, 409, str(exc))

    @app.exception_handler(InvalidArgument)
    async def invalid(request: Request, exc: InvalidArgument) -> Response:
        if _is_api(request):
            # The shape of FastAPI's own 422, so that one schema describes every 422.
            body = {"detail": [{"loc": ["request"], "msg": str(exc), "type": "value_error"}]}
            return JSONResponse(body, status_code=422)
        return error_page(request, 422, str(exc))

    @app.exception_handler(StoreUnavailable)
    @app.exception_handler(StoreClosed)
    async def unavailable(request: Request, exc: TidingsError) -> Response:
        return error_response(request, 503, str(exc))

    @app.exception_handler(TidingsError)
    async def failed(request: Request, exc: TidingsError) -> Response:
        # A failure of the surroundings (an outage) is a 503: trying again later may succeed.
        status = 503 if is_transient(exc) else 500
        return error_response(request, status, f"{type(exc).__name__}: {exc}")

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        if _is_api(request):
            from fastapi.exception_handlers import request_validation_exception_handler

            return await request_validation_exception_handler(request, exc)
        messages = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return error_page(request, 422, f"bad request: {messages}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        response = error_response(request, exc.status_code, str(exc.detail))
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response
