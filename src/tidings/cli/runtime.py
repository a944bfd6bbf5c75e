"""What every command shares: choosing the store, opening it for reading, running the library.

The library is async; commands are sync and call :func:`run`, which runs one coroutine with
``asyncio.run`` and turns a :class:`~tidings.TidingsError` into one red line on stderr and exit 1.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape

from tidings.errors import StoreError, TidingsError
from tidings.store import EventStore, TrackingStore, open_store, require
from tidings.store.sqlite import SQLiteConfig, sqlite_path_exists

__all__ = ["DEFAULT_STORE", "STORE_ENV", "StoreOption", "fail", "open_existing", "open_tracking", "run"]

T = TypeVar("T")

STORE_ENV = "TIDINGS_STORE"
"""Environment variable naming the store when ``--store`` is not given."""

DEFAULT_STORE = "sqlite:///tidings.db"
"""The store used when neither ``--store`` nor ``TIDINGS_STORE`` is given."""

StoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        envvar=STORE_ENV,
        help="Store URL: sqlite:///path.db, postgresql://..., memory://",
        show_default=True,
    ),
]


def open_existing(url: str) -> EventStore:
    """The store at ``url``, for commands that only read.

    Unlike :func:`tidings.open_store`, it refuses to conjure up an empty SQLite file: if the file
    behind a ``sqlite:`` URL does not exist, it raises :class:`~tidings.StoreError` naming the path
    and creates nothing. Other errors are those of :func:`tidings.open_store`.
    """
    if urlsplit(url).scheme == "sqlite" and not sqlite_path_exists(url):
        path = os.path.abspath(SQLiteConfig.from_url(url).path)
        raise StoreError(
            f"no tidings store at {url}: the file {path!r} does not exist (pass --store or set {STORE_ENV})"
        )
    return open_store(url)


def open_tracking(url: str, command: str) -> TrackingStore:
    """:func:`open_existing`, for commands that read checkpoints or dead letters: raises
    :class:`~tidings.UnsupportedOperation` naming ``command`` if the backend has no such records."""
    return require(open_existing(url), TrackingStore, command)


def fail(message: str) -> NoReturn:
    """Print ``message`` as one red ``error:`` line on stderr and exit with code 1."""
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"[bold red]error:[/] [red]{escape(message)}[/]"
    )
    raise typer.Exit(1)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in a fresh event loop and return its result.

    A :class:`~tidings.TidingsError` is reported with :func:`fail` (exit code 1, no traceback);
    ``KeyboardInterrupt`` propagates, after the coroutine has been cancelled and its stores closed.
    """
    try:
        return asyncio.run(coro)
    except TidingsError as exc:
        fail(str(exc).replace("\n", " "))
