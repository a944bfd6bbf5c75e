"""``tidings sagas list|show``: each saga instance's state, current step and history."""

from __future__ import annotations

from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.table import Table

from tidings.cli.helpformat import HelpGroup
from tidings.cli.runtime import DEFAULT_STORE, StoreOption, open_existing, run
from tidings.errors import InvalidArgument
from tidings.sagas.queries import STATUSES, SagaSummary, list_sagas, saga_history, saga_state
from tidings.store.tracking import SQLStore, require

__all__ = ["sagas_app"]

sagas_app = typer.Typer(
    cls=HelpGroup, help="Inspect sagas: their state, current step and history.", no_args_is_help=True
)


def _summary_json(s: SagaSummary) -> dict[str, Any]:
    return {
        "saga_id": s.saga_id,
        "name": s.name,
        "status": s.status,
        "step": s.step,
        "due_at": None if s.due_at is None else s.due_at.isoformat(),
        "updated_at": s.updated_at.isoformat(),
        "reason": s.reason,
    }


@sagas_app.command("list")
def list_command(
    state: Annotated[
        str | None,
        typer.Option("--state", metavar="STATE", help=f"Only sagas in this state: {', '.join(STATUSES)}."),
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", metavar="SAGA", help="Only sagas of this kind.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, metavar="N", help="At most this many, most recent first.")
    ] = 100,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """List saga instances with their state and the step they wait on."""
    if state is not None and state not in STATUSES:
        raise typer.BadParameter(f"unknown state {state!r}; use one of {', '.join(STATUSES)}")

    async def fetch() -> list[SagaSummary]:
        async with open_existing(store) as opened:
            return await list_sagas(
                require(opened, SQLStore, "tidings sagas list"), name=name, status=state, limit=limit
            )

    found = run(fetch())
    if json_output:
        for s in found:
            typer.echo(orjson.dumps(_summary_json(s)).decode())
        return
    table = Table(title=f"Sagas ({len(found)})")
    for column in ("saga", "state", "step", "deadline", "updated", "reason"):
        table.add_column(column, overflow="fold")
    for s in found:
        table.add_row(
            s.saga_id,
            s.status,
            s.step or "-",
            "-" if s.due_at is None else s.due_at.isoformat(timespec="seconds"),
            s.updated_at.isoformat(timespec="seconds"),
            s.reason or "",
        )
    Console().print(table)


@sagas_app.command("show")
def show_command(
    saga_id: Annotated[str, typer.Argument(metavar="SAGA_ID", help="The saga's id, e.g. saga-checkout-42.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    store: StoreOption = DEFAULT_STORE,
) -> None:
    """Show one saga: its state, data, the step it waits on, and every transition it went through."""

    async def fetch() -> tuple[Any, list[Any]]:
        async with open_existing(store) as opened:
            history = await saga_history(opened, saga_id)
            if not history:
                raise InvalidArgument(f"no saga {saga_id!r} in {opened.safe_url}")
            return await saga_state(opened, saga_id), history

    state, history = run(fetch())
    steps = [
        {
            "version": e.version,
            "time": e.timestamp.isoformat(),
            "type": e.event_type.rsplit(".", 1)[-1],
            "data": e.event.model_dump(mode="json") if hasattr(e.event, "model_dump") else {},
        }
        for e in history
    ]
    if json_output:
        out = {
            "saga_id": saga_id,
            "status": state.status,
            "step": state.step,
            "reason": state.reason,
            "data": state.data,
            "compensate": state.done,
            "history": steps,
        }
        typer.echo(orjson.dumps(out).decode())
        return
    console = Console()
    console.print(f"[bold]{saga_id}[/]  state: [bold]{state.status}[/]  step: {state.step or '-'}")
    if state.reason:
        console.print(f"reason: {state.reason}")
    console.print(f"data: {orjson.dumps(state.data).decode()}")
    table = Table(title="History")
    for column in ("v", "time", "transition", "details"):
        table.add_column(column, overflow="fold")
    for step in steps:
        details = orjson.dumps(step["data"]).decode() if step["data"] else ""
        table.add_row(str(step["version"]), step["time"], step["type"], details)
    console.print(table)
