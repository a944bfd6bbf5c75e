"""``tidings db migrate``: create or upgrade a store's schema explicitly."""

from __future__ import annotations

from urllib.parse import urlsplit

import typer
from rich.console import Console

from tidings.cli.helpformat import HelpGroup
from tidings.cli.runtime import DEFAULT_STORE, StoreOption, run
from tidings.store import open_store

__all__ = ["db_app"]

db_app = typer.Typer(cls=HelpGroup, help="The store's database schema.", no_args_is_help=True)


async def _migrate(url: str) -> list[int]:
    if urlsplit(url).scheme in ("postgresql", "postgres"):
        from tidings.store.postgres import migrate

        return await migrate(url)
    # SQLite and memory stores create and check their schema when they open.
    async with open_store(url):
        return []


@db_app.command("migrate")
def migrate_command(store: StoreOption = DEFAULT_STORE) -> None:
    """Apply pending schema migrations (idempotent; safe to run concurrently)."""
    applied = run(_migrate(store))
    if applied:
        Console().print(f"applied migrations {', '.join(map(str, applied))}")
    else:
        Console().print("schema is up to date")
