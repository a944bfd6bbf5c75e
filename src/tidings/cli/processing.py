"""Commands for running services and operating their subscriptions.

``tidings run APP``, ``tidings projections status|rebuild``, ``tidings groups`` (the dead-letter
commands are in :mod:`tidings.cli.dlq`). ``APP`` is ``module:attribute`` naming a
:class:`~tidings.Service` (or a function returning one), see :mod:`tidings.cli.services`.
"""

from __future__ import annotations

import os
import sys
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tidings.cli.bus import BusOption
from tidings.cli.helpformat import HelpGroup
from tidings.cli.render import Column, JsonLines, Records
from tidings.cli.runtime import (
    DEFAULT_STORE,
    ServiceStoreOption,
    StoreOption,
    fail,
    open_existing,
    open_tracking,
    require_existing,
    run,
)
from tidings.cli.services import AppArgument, AppOption, cli_service
from tidings.processing.projections import ProjectionStatus, projection_status, rebuild_projection
from tidings.processing.status import GroupStatus, group_status
from tidings.store.base import mask_password

__all__ = ["groups", "projections_app", "run_service"]

JsonOption = Annotated[
    bool, typer.Option("--json", metavar="", help="Print JSON lines (one object per line).")
]

projections_app = typer.Typer(
    cls=HelpGroup, help="Projections (SQL read models): status and rebuild.", no_args_is_help=True
)


def run_service(app: AppArgument, store: ServiceStoreOption = None, bus: BusOption = None) -> None:
    """Run a service's handlers and projections until SIGINT/SIGTERM, then stop gracefully.

    A second Ctrl-C while stopping forces the exit at once (exit code 130); events in flight are
    not committed and are delivered again at the next start.
    """
    service = cli_service(app, store)
    if bus is not None:
        service.use_bus(bus)
    console = Console(stderr=True, highlight=False)

    def stopping() -> None:
        console.print("stopping: finishing the events in hand — Ctrl-C again to force")

    async def serve() -> None:
        opened = await service.open()

        def started() -> None:
            on_bus = "" if service.bus_url is None else f" and bus {escape(mask_password(service.bus_url))}"
            console.print(
                f"[green]running[/] service [bold]{escape(service.name)}[/] on "
                f"{escape(opened.safe_url)}{on_bus} — Ctrl-C to stop"
            )

        try:
            await service.serve(on_start=started, on_stop=stopping)
        except KeyboardInterrupt:
            # A forced stop waits for nothing: not for the store to close, nor for a handler's
            # thread, which asyncio.run would join on the way out (it cannot be interrupted).
            console.print(
                "[red]forced stop[/]: events in flight were not committed; "
                "they are delivered again at the next start"
            )
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        finally:
            await opened.close()

    run(serve())
    console.print(f"service [bold]{escape(service.name)}[/] stopped; checkpoints saved")


# -- groups -----------------------------------------------------------------------------------------


def _when(instant: datetime | None) -> str:
    return "-" if instant is None else instant.strftime("%Y-%m-%d %H:%M:%S")


_RUNNER_COLUMNS = (
    Column("State", "id"),
    Column("Holder", "id"),
    Column("Heartbeat (UTC)", "id"),
    Column("Dead", "number"),
)
"""The columns a group and a projection share: who runs it, how it is, what it parked."""


def _runner_cells(status: GroupStatus | ProjectionStatus) -> tuple[str, str, str, str]:
    return status.state, status.holder or "-", _when(status.heartbeat_at), str(status.dead_letters)


def groups(store: StoreOption = DEFAULT_STORE, json_output: JsonOption = False) -> None:
    """List the subscription groups: checkpoint, lag, state, and the process running each."""

    async def fetch() -> list[GroupStatus]:
        async with open_tracking(store, "tidings groups") as opened:
            return await group_status(opened)

    found = run(fetch())
    if json_output:
        lines = JsonLines()
        for g in found:
            lines.add(
                {
                    "group": g.group,
                    "checkpoint": g.checkpoint,
                    "head": g.head,
                    "lag": g.lag,
                    "state": g.state,
                    "holder": g.holder,
                    "host": g.host,
                    "pid": g.pid,
                    "heartbeat_at": None if g.heartbeat_at is None else g.heartbeat_at.isoformat(),
                    "last_error": g.last_error,
                    "dead_letters": g.dead_letters,
                }
            )
        return
    head = found[0].head if found else 0
    console = Console()
    records = Records(
        console,
        f"Subscription groups (head {head})",
        [
            Column("Group", "id", "magenta"),
            Column("Checkpoint", "number", "cyan"),
            Column("Lag", "number"),
            *_RUNNER_COLUMNS,
        ],
        empty="none",
    )
    for g in found:
        records.add(
            g.group,
            str(g.checkpoint),
            str(g.lag),
            *_runner_cells(g),
        )
    records.finish()
    # A failing runner's error under the table: too long for a cell, and it says what to do.
    for g in found:
        if g.state == "failed" and g.last_error:
            console.print(f"[red]{escape(g.group)}[/]: {escape(g.last_error)}", highlight=False)


# -- projections ------------------------------------------------------------------------------------


def replay_progress(description: str) -> Progress:
    """A progress bar over log positions for long replays, drawn on stderr and only when stderr is
    a terminal (disabled otherwise, so piped output and ``--json`` stay clean); it disappears
    when done."""
    console = Console(stderr=True)
    return Progress(
        TextColumn(escape(description)),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} positions"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


@projections_app.command("status")
def projections_status(store: StoreOption = DEFAULT_STORE, json_output: JsonOption = False) -> None:
    """Each projection's generation, checkpoint and lag (and a rebuild under way)."""

    async def fetch() -> list[Any]:
        async with open_existing(store) as opened:
            return await projection_status(opened)

    found = run(fetch())
    if json_output:
        lines = JsonLines()
        for s in found:
            lines.add(
                {
                    "name": s.name,
                    "generation": s.generation,
                    "building": s.building,
                    "checkpoint": s.checkpoint,
                    "head": s.head,
                    "lag": s.lag,
                    "state": s.state,
                    "needs_rebuild": s.needs_rebuild,
                    "fingerprint": s.fingerprint,
                    "dead_letters": s.dead_letters,
                    "holder": s.holder,
                    "heartbeat_at": None if s.heartbeat_at is None else s.heartbeat_at.isoformat(),
                    "last_error": s.last_error,
                }
            )
        return
    console = Console()
    records = Records(
        console,
        "Projections",
        [
            Column("Projection", "id", "magenta"),
            Column("Generation", "number"),
            Column("Checkpoint", "number", "cyan"),
            Column("Lag", "number"),
            *_RUNNER_COLUMNS,
        ],
        empty="none",
    )
    for s in found:
        records.add(
            s.name,
            str(s.generation),
            str(s.checkpoint),
            str(s.lag),
            *_runner_cells(s),
        )
    records.finish()
    for s in found:
        if s.needs_rebuild:
            console.print(
                f"[red]{escape(s.name)}[/]: its code changed since generation {s.generation} was built "
                f"({s.dead_letters} dead letters); run 'tidings projections rebuild {escape(s.name)} "
                "--app MODULE:SERVICE'",
                highlight=False,
            )


@projections_app.command("rebuild")
def projections_rebuild(
    name: Annotated[str, typer.Argument(metavar="NAME", show_default=False, help="The projection's name.")],
    app: AppOption,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            metavar="",
            help="Take over a rebuild that was abandoned (its process killed); a rebuild still "
            "running elsewhere is superseded and fails.",
        ),
    ] = False,
    store: ServiceStoreOption = None,
) -> None:
    """Rebuild a projection by replay, blue/green: the old one serves until the new one caught up."""
    service = cli_service(app, store)
    projection = service.projections.get(name)
    if projection is None:
        known = ", ".join(sorted(service.projections)) or "none"
        fail(f"service {service.name!r} has no projection {name!r} (it has: {known})", code=2)

    # A progress bar on a terminal only: a pipe or a log gets the result line alone.
    bar = replay_progress(f"rebuilding {name}")

    async def rebuild() -> int:
        if store is not None:
            require_existing(store)
        opened = await service.open()
        try:
            with bar:
                task = bar.add_task("replay", total=await opened.head())
                return await rebuild_projection(
                    opened,
                    projection,
                    force=force,
                    progress=lambda done, head: bar.update(task, completed=done, total=head),
                )
        finally:
            await opened.close()

    generation = run(rebuild())
    Console().print(f"projection {escape(name)} rebuilt; generation {generation} is now serving")
