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

__all__ = [
    "DEFAULT_STORE",
    "STORE_ENV",
    "STORE_PRECEDENCE",
    "ServiceStoreOption",
    "StoreOption",
    "fail",
    "open_existing",
    "open_tracking",
    "require_existing",
    "run",
]

T = TypeVar("T")

STORE_ENV = "TIDINGS_STORE"
"""Environment variable naming the store when ``--store`` is not given."""

DEFAULT_STORE = "sqlite:///tidings.db"
"""The store used when neither ``--store`` nor ``TIDINGS_STORE`` is given."""

STORE_PRECEDENCE = f"--store, then ${STORE_ENV}, then the service's own store, then {DEFAULT_STORE}"
"""Where a command that loads a service finds its store, first match wins."""

StoreOption = Annotated[
    str,
    typer.Option(
        "--store",
        envvar=STORE_ENV,
        metavar="URL",
        help="Store URL: sqlite:///path.db, postgresql://user@host/db, memory://",
        show_default=True,
    ),
]

ServiceStoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        envvar=STORE_ENV,
        metavar="URL",
        help=f"Store URL; overrides the service's own. Precedence: {STORE_PRECEDENCE}.",
        show_default=False,
    ),
]
"""``--store`` of the commands that load a service: unset means the service's own store."""


def open_existing(url: str) -> EventStore:
    """The store at ``url``, for commands that only read.

    Unlike :func:`tidings.open_store`, it refuses to conjure up an empty SQLite file: if the file
    behind a ``sqlite:`` URL does not exist, it raises :class:`~tidings.StoreError` naming the path
    and creates nothing. Other errors are those of :func:`tidings.open_store`.
    """
    require_existing(url)
    return open_store(url)


def require_existing(url: str) -> None:
    """Raise :class:`~tidings.StoreError` naming the path if ``url`` is a ``sqlite:`` URL whose file
    does not exist; create nothing. For commands that operate on a store that must already be
    there (reading, retrying dead letters, rebuilding a projection)."""
    if urlsplit(url).scheme == "sqlite" and not sqlite_path_exists(url):
        path = os.path.abspath(SQLiteConfig.from_url(url).path)
        raise StoreError(
            f"no tidings store at {url}: the file {path!r} does not exist (pass --store or set {STORE_ENV})"
        )


def open_tracking(url: str, command: str) -> TrackingStore:
    """:func:`open_existing`, for commands that read checkpoints or dead letters: raises
    :class:`~tidings.UnsupportedOperation` naming ``command`` if the backend has no such records."""
    return require(open_existing(url), TrackingStore, command)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``message`` as one red ``error:`` line on stderr and exit with ``code`` (1: the
    operation failed, 2: the command line is wrong)."""
    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"[bold red]error:[/] [red]{escape(message)}[/]"
    )
    raise typer.Exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` in a fresh event loop and return its result.

    A :class:`~tidings.TidingsError` is reported with :func:`fail` (exit code 1, no traceback);
    ``KeyboardInterrupt`` propagates, after the coroutine has been cancelled and its stores closed.
    """
    try:
        return asyncio.run(coro)
    except TidingsError as exc:
        fail(str(exc).replace("\n", " "))
