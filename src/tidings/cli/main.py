"""The ``tidings`` command's Typer app: parse, call the library, render.

Commands: ``streams``, ``events``, ``trace``, ``demo``, ``run``, ``groups``, ``dlq``,
``projections``, ``serve`` and ``db`` (``tidings --help`` lists them). Every command that takes
``--store URL`` also reads ``$TIDINGS_STORE``; reading commands default to ``sqlite:///tidings.db``
and never create a missing SQLite file; commands that load a service (``run``, ``dlq retry``, ``projections
rebuild``) use ``--store``, then ``$TIDINGS_STORE``, then the service's own store, then
``sqlite:///tidings.db``. ``--json`` prints JSON lines. Exit codes: 0 on success (also when
``--follow`` is ended by Ctrl-C), 1 on a :class:`~tidings.TidingsError` or a failed operation, 2 on
a usage error (including an ``APP`` that is not a service), 130 when a second Ctrl-C forces
``tidings run`` to stop.
"""

from __future__ import annotations

import contextlib
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tidings import __version__
from tidings.cli import processing, reading, render, serve
from tidings.cli.bus import bus_app
from tidings.cli.db import db_app
from tidings.cli.dlq import dlq_app
from tidings.cli.helpformat import HelpGroup
from tidings.cli.runtime import DEFAULT_STORE, StoreOption, run
from tidings.cli.sagas import sagas_app
from tidings.cli.trace import trace
from tidings.events import RecordedEvent

__all__ = ["app", "main"]

app = typer.Typer(
    cls=HelpGroup,
    name="tidings",
    help="Run, inspect and operate tidings services and event stores.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

JsonOption = Annotated[
    bool, typer.Option("--json", metavar="", help="Print JSON lines (one object per line).")
]


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"tidings {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """tidings: typed events, an event store, event sourcing."""


@app.command()
def streams(
    store: StoreOption = DEFAULT_STORE,
    prefix: Annotated[
        str | None, typer.Option(metavar="PREFIX", help="Only streams whose id starts with this.")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """List the streams with their version and the position of their last event."""
    if json_output:
        lines = render.JsonLines()
        run(reading.each_stream(store, prefix, lambda info: lines.add(render.stream_json(info))))
        return
    table = render.StreamTable(Console())
    run(reading.each_stream(store, prefix, table.add))
    table.finish()


@app.command()
def events(
    stream: Annotated[
        str | None, typer.Argument(metavar="STREAM", help="The stream to print (or use --all).")
    ] = None,
    all_streams: Annotated[bool, typer.Option("--all", help="Print the global log.")] = False,
    after: Annotated[
        int, typer.Option(metavar="N", min=0, help="Start after this position (--all) or version (STREAM).")
    ] = 0,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="With --all: keep printing new events until Ctrl-C.")
    ] = False,
    types: Annotated[
        list[str] | None,
        typer.Option("--type", "-t", metavar="TYPE", help="Only events of this type (repeatable)."),
    ] = None,
    json_output: JsonOption = False,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Print the events of STREAM, or of the whole log with --all."""
    if (stream is None) != all_streams:
        raise typer.BadParameter("give either a STREAM or --all", param_hint="STREAM")
    if follow and not all_streams:
        raise typer.BadParameter("--follow works with --all only", param_hint="--follow")
    type_names = tuple(types) if types else None
    console = Console()
    if follow:
        if type_names is not None:
            _warn_unknown_types(store, type_names)
        emit = _event_json_printer() if json_output else render.EventLines(console).add
        # Ctrl-C is how --follow is meant to end, so it is a clean exit, not an error.
        with contextlib.suppress(KeyboardInterrupt):
            run(reading.follow_events(store, after, type_names, emit))
        return
    query = reading.EventQuery(stream, after, type_names)
    count = 0
    if json_output:
        printer = _event_json_printer()

        def emit_json(recorded: RecordedEvent) -> None:
            nonlocal count
            count += 1
            printer(recorded)

        run(reading.each_event(store, query, emit_json))
    else:
        table = render.EventTable(console, "Global log" if stream is None else f"Stream {stream}")
        run(reading.each_event(store, query, table.add))
        table.finish()
        count = table.count
    if count == 0 and type_names is not None:
        _warn_unknown_types(store, type_names)


def _warn_unknown_types(store: str, type_names: tuple[str, ...]) -> None:
    """Warn on stderr about --type names that nothing has: likely a typo, or a missing prefix."""
    check = run(reading.check_types(store, type_names))
    if check.unknown:
        names = ", ".join(map(repr, check.unknown))
        known = ", ".join(check.known) or "none (the store is empty)"
        Console(stderr=True, soft_wrap=True, highlight=False).print(
            f"[yellow]warning:[/] no event type {escape(names)} is registered or stored; "
            f"known types: {escape(known)}"
        )


@app.command(
    "demo",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def demo(ctx: typer.Context) -> None:
    """The reference order-processing system: six services, choreography or saga, failures
    injected, invariants checked, a summary and a causal trace (tidings demo --help)."""
    # Imported on use: the demo's event classes must not join the registry of every command.
    from tidings.demo.shop.cli import main as shop_main

    raise typer.Exit(shop_main(list(ctx.args)))


@app.command("tour")
def tour(
    store: Annotated[
        str | None,
        typer.Option(
            "--store", metavar="URL", help="Store URL to run the demo in (default: a new file in a temp dir)."
        ),
    ] = None,
) -> None:
    """A guided tour on a bank account: commands, invariants, a conflict, time travel, a snapshot."""
    from tidings.demo import bank  # imported here: it registers the demo's event classes

    url = store if store is not None else bank.fresh_store_url()
    run(bank.run_demo(url, Console()))


app.command("run")(processing.run_service)
app.command("groups")(processing.groups)
app.command("serve")(serve.serve)
app.command("trace")(trace)
app.add_typer(dlq_app, name="dlq")
app.add_typer(processing.projections_app, name="projections")
app.add_typer(db_app, name="db")
app.add_typer(sagas_app, name="sagas")
app.add_typer(bus_app, name="bus")


def _event_json_printer() -> reading.EventSink:
    lines = render.JsonLines()
    return lambda recorded: lines.add(render.event_json(recorded))


def main() -> None:
    """Entry point of the ``tidings`` script."""
    app(prog_name="tidings")
