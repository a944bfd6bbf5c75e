"""``tidings bus setup``: create or check the bus's durable state for services, before they run.

On NATS JetStream this creates (or checks and updates) each publishing service's stream -- file
storage, the configured replicas, retention limits and de-duplication window, with its partition
count recorded -- and the stream of partition leases. Services do the same when they start; running
it first, from a deploy step, makes a misconfiguration (a partition count that differs from the
live stream's) fail before any service starts. The memory bus keeps nothing: nothing to set up.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from tidings.bus import SetupAction, open_bus
from tidings.cli.helpformat import HelpGroup
from tidings.cli.runtime import run

__all__ = ["BUS_ENV", "BusOption", "bus_app"]

BUS_ENV = "TIDINGS_BUS"
"""Environment variable naming the bus when ``--bus`` is not given."""

BusOption = Annotated[
    str | None,
    typer.Option(
        "--bus",
        envvar=BUS_ENV,
        metavar="URL",
        help="Bus URL: memory:// or nats://host:port[,host:port...] (default: $TIDINGS_BUS; none).",
    ),
]

bus_app = typer.Typer(cls=HelpGroup, help="The event bus between services.", no_args_is_help=True)


@bus_app.command("setup")
def setup_command(
    services: Annotated[
        list[str],
        typer.Argument(
            metavar="SERVICE...", help="The publishing services whose streams to create or check."
        ),
    ],
    bus: BusOption = None,
) -> None:
    """Create or check the streams of the given services (and the lease stream) on the bus."""
    url = bus or os.environ.get(BUS_ENV)
    if not url:
        raise typer.BadParameter(f"give --bus URL or set {BUS_ENV}", param_hint="--bus")
    console = Console()

    async def setup() -> list[SetupAction]:
        async with open_bus(url) as opened:
            return await opened.setup(publishing=services)

    actions = run(setup())
    if not actions:
        console.print("nothing to set up: this bus keeps no durable state")
    for action in actions:
        detail = f" ({escape(action.detail)})" if action.detail else ""
        console.print(
            f"[green]{escape(action.action)}[/] {escape(action.kind)} {escape(action.name)}{detail}"
        )
