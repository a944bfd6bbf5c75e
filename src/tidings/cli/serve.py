"""``tidings serve``: the web console (HTTP API and pages) with uvicorn.

Needs the ``web`` extra (``pip install 'tidings[web]'``); without it the command fails with that
fix. Read-only unless a token is given (``--token`` or ``$TIDINGS_CONSOLE_TOKEN``): then the
actions (retry or discard a dead letter, rebuild a projection) need ``Authorization: Bearer
TOKEN``. Retry and rebuild also need the service (``--app module:attribute``), whose handlers
and projections they run.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tidings.cli.runtime import DEFAULT_STORE, STORE_ENV, fail, require_existing
from tidings.cli.services import cli_service
from tidings.cli.trace import parse_sources, store_from_env
from tidings.errors import TidingsError
from tidings.store import EventStore, open_store

__all__ = ["TOKEN_ENV", "serve"]

TOKEN_ENV = "TIDINGS_CONSOLE_TOKEN"
"""Environment variable holding the action token when ``--token`` is not given."""


def serve(
    stores: Annotated[
        list[str] | None,
        typer.Option(
            "--store",
            metavar="[NAME=]URL",
            help="Store URL, or NAME=URL (repeatable, as for 'tidings trace': the causal trace joins "
            f"every store; the other pages read the first). Default: ${STORE_ENV}, then {DEFAULT_STORE}.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[str, typer.Option(metavar="HOST", help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", min=0, max=65535, help="Port to listen on.")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            envvar=TOKEN_ENV,
            metavar="TOKEN",
            help=f"Enable the actions for requests with 'Authorization: Bearer TOKEN' (or ${TOKEN_ENV}).",
            show_default=False,
        ),
    ] = None,
    app: Annotated[
        str | None,
        typer.Option(
            "--app",
            metavar="APP",
            help="The service (module:attribute) whose handlers retry dead letters and rebuild projections.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the web console: streams, events, live tail, groups, dead letters, sagas, traces."""
    try:
        import uvicorn

        from tidings.web import create_app
        from tidings.web.server import ConsoleServer

        named = parse_sources(stores or store_from_env())
        service = None
        if app is not None:
            service = cli_service(app, next(iter(named.values()), None))
            if not named:
                named = parse_sources([service.store_url or DEFAULT_STORE])
        if not named:
            named = parse_sources([DEFAULT_STORE])
        for url in named.values():
            require_existing(url)
        sources: dict[str, EventStore] = {name: open_store(url) for name, url in named.items()}
        default = next(iter(sources.values()))
        if service is not None:
            service.use_store(default)
        application = create_app(default, token=token, service=service, sources=sources)
    except TidingsError as exc:
        fail(str(exc).replace("\n", " "))
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    actions = "enabled (bearer token)" if token else "disabled (no --token)"

    def ready() -> None:
        console.print(
            f"[green]tidings console[/] on [bold]http://{escape(host)}:{port}/[/] reading "
            f"{escape(default.safe_url)}; actions {actions} — Ctrl-C to stop"
        )

    config = uvicorn.Config(
        application,
        host=host,
        port=port,
        log_level="warning",
        # Live tails never end on their own: give them this long once Ctrl-C is pressed.
        timeout_graceful_shutdown=2,
    )
    server = ConsoleServer(config, application.state.console, ready)
    listener = _listen(host, port)
    port = listener.getsockname()[1]  # the one the system chose for --port 0
    # uvicorn shuts down gracefully on Ctrl-C, then raises it again: the way to stop, so exit 0.
    with contextlib.suppress(KeyboardInterrupt), listener:
        server.run(sockets=[listener])
    if server.failure is not None:
        fail(str(server.failure).replace("\n", " "))
    console.print("tidings console stopped")


def _listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``; exits with one error line if it cannot be bound
    (uvicorn would print its own error and exit 3)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
