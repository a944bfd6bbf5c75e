"""``tidings dlq list|show|retry|discard``: the dead letters (events a handler could not process).

``retry`` needs the service (``--app module:attribute``): it runs the group's own handler on the
parked event once more, and removes the dead letter if that succeeds, atomically with the
handler's effects. A retry that fails again leaves the letter parked with the new error.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from tidings.cli.helpformat import HelpGroup
from tidings.cli.render import Column, JsonLines, Records, event_data
from tidings.cli.runtime import (
    DEFAULT_STORE,
    ServiceStoreOption,
    StoreOption,
    fail,
    open_tracking,
    require_existing,
    run,
)
from tidings.cli.services import AppOption, cli_service
from tidings.errors import InvalidArgument, TidingsError
from tidings.events import RecordedEvent
from tidings.service import Service
from tidings.store import EventStore
from tidings.store.tracking import DeadLetter, TrackingStore, require

__all__ = ["dlq_app"]

dlq_app = typer.Typer(
    cls=HelpGroup, help="Dead letters: events a handler could not process.", no_args_is_help=True
)

JsonOption = Annotated[
    bool, typer.Option("--json", metavar="", help="Print JSON lines (one object per line).")
]
IdArgument = Annotated[
    int, typer.Argument(metavar="ID", min=1, help="The dead letter's id (see 'tidings dlq list').")
]


def dead_json(dead: DeadLetter) -> dict[str, Any]:
    """The JSON object of a dead letter (``dlq list --json``; ``show`` adds the event)."""
    return {
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


@dlq_app.command("list")
def dlq_list(
    group: Annotated[str | None, typer.Option(metavar="GROUP", help="Only this subscription group.")] = None,
    store: StoreOption = DEFAULT_STORE,
    json_output: JsonOption = False,
) -> None:
    """List parked events, oldest first."""

    async def fetch() -> list[DeadLetter]:
        async with open_tracking(store, "tidings dlq") as opened:
            return await opened.dead_letters(group)

    found = run(fetch())
    if json_output:
        lines = JsonLines()
        for dead in found:
            lines.add(dead_json(dead))
        return
    records = Records(
        Console(),
        "Dead letters",
        [
            Column("Id", "number", "cyan"),
            Column("Group", "id", "magenta"),
            Column("Pos", "number"),
            Column("Stream", "id"),
            Column("Type", "id", "green"),
            Column("Attempts", "number"),
            Column("Error"),
        ],
        empty="none" if group is None else f"none in group {group}",
    )
    for d in found:
        records.add(str(d.id), d.group, str(d.position), d.stream_id, d.event_type, str(d.attempts), d.error)
    records.finish()


async def _event_of(store: EventStore, dead: DeadLetter) -> RecordedEvent | None:
    """The parked event, read from the log (None if it is no longer there)."""
    async for recorded in store.read_all(after=dead.position - 1, limit=1, raw_unknown=True):
        if recorded.event_id == dead.event_id:
            return recorded
    return None


@dlq_app.command("show")
def dlq_show(id: IdArgument, store: StoreOption = DEFAULT_STORE, json_output: JsonOption = False) -> None:
    """Show one parked event: where it came from, its data and metadata, its error and traceback."""

    async def fetch() -> tuple[DeadLetter, RecordedEvent | None]:
        async with open_tracking(store, "tidings dlq") as opened:
            dead = await opened.dead_letter(id)
            if dead is None:
                raise InvalidArgument(f"no dead letter with id {id}")
            return dead, await _event_of(opened, dead)

    dead, recorded = run(fetch())
    out = dead_json(dead)
    out["version"] = None if recorded is None else recorded.version
    out["data"] = None if recorded is None else event_data(recorded)
    out["metadata"] = None if recorded is None else dict(recorded.metadata)
    out["traceback"] = dead.traceback
    if json_output:
        JsonLines().add(out)
        return
    console = Console(highlight=False)
    version = "" if recorded is None else f", version {recorded.version}"
    console.print(Text(f"Dead letter {dead.id}", style="bold"))
    for label, value in [
        ("group", dead.group),
        ("position", str(dead.position)),
        ("stream", f"{dead.stream_id}{version}"),
        ("event", f"{dead.event_type} {dead.event_id}"),
        ("attempts", str(dead.attempts)),
        ("failed at", dead.failed_at.isoformat()),
        ("error", dead.error),
    ]:
        console.print(Text.assemble((f"{label:<10}", "dim"), value), soft_wrap=True)
    if recorded is None:
        console.print(Text("the event is no longer in the log", style="yellow"))
    else:
        for label in ("data", "metadata"):
            console.print(Text(label.capitalize(), style="bold"))
            console.print(_pretty(out[label]), markup=False, soft_wrap=True)
    console.print(Text("Traceback", style="bold"))
    console.print(dead.traceback.rstrip(), markup=False, soft_wrap=True)


def _pretty(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What retrying one dead letter did: ``processed`` (and removed) or ``failed`` (with why)."""

    dead: DeadLetter
    processed: bool
    error: str | None

    def json(self) -> dict[str, Any]:
        return {
            "id": self.dead.id,
            "group": self.dead.group,
            "position": self.dead.position,
            "stream_id": self.dead.stream_id,
            "event_type": self.dead.event_type,
            "outcome": "processed" if self.processed else "failed",
            "error": self.error,
        }


async def _retry_one(service: Service, store: TrackingStore, dead: DeadLetter) -> Outcome:
    try:
        if await service.subscription(dead.group).retry_dead_letter(dead):
            return Outcome(dead, True, None)
    except TidingsError as exc:
        return Outcome(dead, False, str(exc))
    # It stays parked, updated with the new error (same group and event).
    again = [d for d in await store.dead_letters(dead.group) if d.event_id == dead.event_id]
    return Outcome(dead, False, again[0].error if again else "failed again")


async def _retry(service: Service, url: str | None, id: int | None, group: str | None) -> list[Outcome]:
    if url is not None:
        require_existing(url)
    store = require(await service.open(), TrackingStore, "tidings dlq retry")
    try:
        if id is not None:
            dead = await store.dead_letter(id)
            if dead is None:
                raise InvalidArgument(f"no dead letter with id {id}")
            if not service.runs_group(dead.group):
                raise InvalidArgument(
                    f"dead letter {id} belongs to group {dead.group!r}, which service "
                    f"{service.name!r} does not run"
                )
            letters = [dead]
        else:
            letters = [d for d in await store.dead_letters(group) if service.runs_group(d.group)]
        letters.sort(key=lambda d: (d.position, d.id))
        return [await _retry_one(service, store, dead) for dead in letters]
    finally:
        await store.close()


@dlq_app.command("retry")
def dlq_retry(
    app: AppOption,
    id: Annotated[
        int | None,
        typer.Argument(
            metavar="ID", min=1, show_default=False, help="The dead letter's id (or use --group / --all)."
        ),
    ] = None,
    group: Annotated[
        str | None,
        typer.Option(metavar="GROUP", help="Retry every dead letter of this group, oldest first."),
    ] = None,
    all_groups: Annotated[
        bool,
        typer.Option("--all", metavar="", help="Retry every dead letter of every group of the service."),
    ] = False,
    store: ServiceStoreOption = None,
    json_output: JsonOption = False,
) -> None:
    """Process parked events again with the service's handlers; remove those that succeed.

    Exit code 0 if every retried letter was processed, 1 if any failed again (it stays parked,
    with the new error).
    """
    if sum((id is not None, group is not None, all_groups)) != 1:
        raise typer.BadParameter("give exactly one of ID, --group GROUP or --all", param_hint="ID")
    service = cli_service(app, store)
    if group is not None and not service.runs_group(group):
        known = ", ".join(sorted(service.groups)) or "none"
        fail(f"service {service.name!r} has no subscription group {group!r} (it has: {known})", code=2)
    outcomes = run(_retry(service, store, id, group))
    failed = [o for o in outcomes if not o.processed]
    if json_output:
        lines = JsonLines()
        for outcome in outcomes:
            lines.add(outcome.json())
        if id is None:
            lines.add(
                {
                    "summary": {
                        "retried": len(outcomes),
                        "processed": len(outcomes) - len(failed),
                        "failed": len(failed),
                    }
                }
            )
    elif id is not None:
        if failed:
            fail(f"dead letter {id} failed again: {failed[0].error}; it stays parked")
        Console().print(f"dead letter {id} processed and removed")
    else:
        _print_outcomes(outcomes, "all groups" if group is None else f"group {group}")
    if failed:
        raise typer.Exit(1)


def _print_outcomes(outcomes: list[Outcome], where: str) -> None:
    console = Console(highlight=False)
    if not outcomes:
        console.print(f"no dead letters in {escape(where)}")
        return
    for o in outcomes:
        d = o.dead
        head = f"{d.id} {d.group} position {d.position} ({d.event_type} in {d.stream_id})"
        if o.processed:
            console.print(Text.assemble(("processed ", "green"), head), soft_wrap=True)
        else:
            console.print(Text.assemble(("failed    ", "red"), head, f": {o.error}"), soft_wrap=True)
    failed = sum(not o.processed for o in outcomes)
    console.print(
        f"{len(outcomes)} retried in {escape(where)}: {len(outcomes) - failed} processed and removed, "
        f"{failed} failed again (still parked)"
    )


@dlq_app.command("discard")
def dlq_discard(id: IdArgument, store: StoreOption = DEFAULT_STORE) -> None:
    """Delete a parked event without processing it."""

    async def discard() -> bool:
        async with open_tracking(store, "tidings dlq") as opened:
            return await opened.discard_dead_letter(id)

    if not run(discard()):
        fail(f"no dead letter with id {id}")
    Console().print(f"dead letter {id} discarded")
