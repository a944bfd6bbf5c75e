"""Commands for running services and operating their subscriptions.

``tidings run APP``, ``tidings dlq list|show|retry|discard``, ``tidings projections
status|rebuild``, ``tidings groups``. ``APP`` is ``module:attribute`` naming a
:class:`~tidings.Service` (or a function returning one), imported with the current directory on
``sys.path`` — as ``uvicorn`` and ``faststream`` do.
"""

from __future__ import annotations

import importlib
import os
import sys
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tidings.cli.render import JsonLines
from tidings.cli.runtime import DEFAULT_STORE, StoreOption, fail, open_existing, run
from tidings.errors import InvalidArgument
from tidings.processing.projections import projection_status, rebuild_projection
from tidings.processing.status import GroupStatus, group_status
from tidings.service import Service
from tidings.store.records import DeadLetter

__all__ = ["dlq_app", "groups", "load_service", "projections_app", "run_service"]

AppArgument = Annotated[str, typer.Argument(help="The service, as module:attribute.")]
AppOption = Annotated[
    str, typer.Option("--app", help="The service that owns the group, as module:attribute.")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON lines (one object per line).")]
OptionalStore = Annotated[
    str | None,
    typer.Option("--store", help="Store URL; overrides the service's own (default: the service's)."),
]

dlq_app = typer.Typer(help="Dead letters: events a handler could not process.", no_args_is_help=True)
projections_app = typer.Typer(help="Projections (SQL read models): status and rebuild.", no_args_is_help=True)


def load_service(spec: str, store: str | None = None) -> Service:
    """Import ``module:attribute`` and return the :class:`Service` it names.

    Raises :class:`InvalidArgument` naming what is wrong (no colon, no module, no attribute, not
    a service). ``store`` replaces the service's store URL.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise InvalidArgument(f"expected module:attribute, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(f"cannot import {module_name!r}: {exc}") from exc
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise InvalidArgument(f"module {module_name!r} has no attribute {attribute!r}") from None
    if callable(target) and not isinstance(target, Service):
        target = target()
    if not isinstance(target, Service):
        raise InvalidArgument(f"{spec} is a {type(target).__qualname__}, not a tidings.Service")
    if store is not None:
        target.use_store(store)
    return target


def run_service(app: AppArgument, store: OptionalStore = None) -> None:
    """Run a service's handlers and projections until SIGINT/SIGTERM, then stop gracefully."""
    try:
        service = load_service(app, store)
    except InvalidArgument as exc:
        fail(str(exc))
    console = Console(stderr=True)
    console.print(f"[green]running[/] service [bold]{service.name}[/] — Ctrl-C to stop")
    run(service.serve())
    console.print(f"service [bold]{service.name}[/] stopped; checkpoints saved")


# -- groups -----------------------------------------------------------------------------------------


def _when(instant: datetime | None) -> str:
    return "-" if instant is None else instant.strftime("%Y-%m-%d %H:%M:%S")


def groups(store: StoreOption = DEFAULT_STORE, json_output: JsonOption = False) -> None:
    """List the subscription groups: checkpoint, lag, state, and the process running each."""

    async def fetch() -> list[GroupStatus]:
        async with open_existing(store) as opened:
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
    table = Table(
        "group",
        "checkpoint",
        "lag",
        "state",
        "holder",
        "heartbeat (UTC)",
        "dead",
        title=f"Subscription groups (head {head})",
    )
    for g in found:
        table.add_row(
            g.group,
            str(g.checkpoint),
            str(g.lag),
            g.state,
            g.holder or "-",
            _when(g.heartbeat_at),
            str(g.dead_letters),
        )
    console = Console()
    console.print(table)
    # A failing runner's error under the table: too long for a cell, and it says what to do.
    for g in found:
        if g.state == "failed" and g.last_error:
            console.print(f"[red]{g.group}[/]: {escape(g.last_error)}", highlight=False)


# -- dead letters -------------------------------------------------------------------------------------


def _dead_json(dead: DeadLetter, *, full: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": dead.id,
        "group": dead.group,
        "position": dead.position,
        "event_id": str(dead.event_id),
        "stream_id": dead.stream_id,
        "event_type": dead.event_type,
        "attempts": dead.attempts,
        "error": dead.error,
        "failed_at": dead.failed_at.isoformat(),
    }
    if full:
        out["traceback"] = dead.traceback
    return out


@dlq_app.command("list")
def dlq_list(
    group: Annotated[str | None, typer.Option(help="Only this subscription group.")] = None,
    store: StoreOption = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """List parked events, oldest first."""

    async def fetch() -> list[DeadLetter]:
        async with open_existing(store) as opened:
            return await opened.dead_letters(group)

    found = run(fetch())
    if json_output:
        lines = JsonLines()
        for dead in found:
            lines.add(_dead_json(dead))
        return
    if not found:
        Console().print("no dead letters")
        return
    table = Table("id", "group", "position", "stream", "type", "attempts", "error", title="Dead letters")
    for d in found:
        table.add_row(
            str(d.id), d.group, str(d.position), d.stream_id, d.event_type, str(d.attempts), d.error
        )
    Console().print(table)


async def _one(store: str, id: int) -> DeadLetter:
    async with open_existing(store) as opened:
        dead = await opened.dead_letter(id)
    if dead is None:
        raise InvalidArgument(f"no dead letter with id {id}")
    return dead


@dlq_app.command("show")
def dlq_show(
    id: Annotated[int, typer.Argument(help="The dead letter's id.")],
    store: StoreOption = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """Show one parked event with its error and traceback."""
    dead = run(_one(store, id))
    if json_output:
        JsonLines().add(_dead_json(dead, full=True))
        return
    console = Console()
    for key, value in _dead_json(dead).items():
        console.print(f"[bold]{key}[/]: {value}")
    console.print(dead.traceback, markup=False, highlight=False)


@dlq_app.command("retry")
def dlq_retry(
    id: Annotated[int, typer.Argument(help="The dead letter's id.")],
    app: AppOption,
    store: OptionalStore = None,
) -> None:
    """Process a parked event again with the service's handler; remove it if that succeeds."""

    async def retry() -> bool:
        service = load_service(app, store)
        opened = await service.open()
        try:
            dead = await opened.dead_letter(id)
            if dead is None:
                raise InvalidArgument(f"no dead letter with id {id}")
            return await service.subscription(dead.group).retry_dead_letter(dead)
        finally:
            await opened.close()

    if run(retry()):
        Console().print(f"dead letter {id} processed and removed")
    else:
        fail(f"dead letter {id} failed again; it stays parked (see 'tidings dlq list')")


@dlq_app.command("discard")
def dlq_discard(
    id: Annotated[int, typer.Argument(help="The dead letter's id.")],
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Delete a parked event without processing it."""

    async def discard() -> bool:
        async with open_existing(store) as opened:
            return await opened.discard_dead_letter(id)

    if not run(discard()):
        fail(f"no dead letter with id {id}")
    Console().print(f"dead letter {id} discarded")


# -- projections ------------------------------------------------------------------------------------


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
    if not found:
        Console().print("no projections")
        return
    table = Table(
        "projection",
        "generation",
        "checkpoint",
        "lag",
        "state",
        "holder",
        "heartbeat (UTC)",
        "dead",
        title="Projections",
    )
    for s in found:
        table.add_row(
            s.name,
            str(s.generation),
            str(s.checkpoint),
            str(s.lag),
            s.state,
            s.holder or "-",
            _when(s.heartbeat_at),
            str(s.dead_letters),
        )
    console = Console()
    console.print(table)
    for s in found:
        if s.needs_rebuild:
            console.print(
                f"[red]{s.name}[/]: its code changed since generation {s.generation} was built "
                f"({s.dead_letters} dead letters); run 'tidings projections rebuild {s.name} "
                "--app MODULE:SERVICE'",
                highlight=False,
            )


@projections_app.command("rebuild")
def projections_rebuild(
    name: Annotated[str, typer.Argument(help="The projection's name.")],
    app: AppOption,
    store: OptionalStore = None,
) -> None:
    """Rebuild a projection by replay, blue/green: the old one serves until the new one caught up."""

    async def rebuild() -> int:
        service = load_service(app, store)
        projection = service.projections.get(name)
        if projection is None:
            known = ", ".join(sorted(service.projections)) or "none"
            raise InvalidArgument(f"service {service.name!r} has no projection {name!r} (it has: {known})")
        opened = await service.open()
        try:
            return await rebuild_projection(opened, projection)
        finally:
            await opened.close()

    generation = run(rebuild())
    Console().print(f"projection {name} rebuilt; generation {generation} is now serving")
