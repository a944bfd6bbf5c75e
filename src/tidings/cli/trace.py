"""``tidings trace REF``: the causal tree of a business transaction across services.

Each ``--store`` is one service's store, as ``URL`` or ``NAME=URL`` (the name labels its events;
an unnamed store is named after its file or schema). ``REF`` is an event id, a correlation id or a
stream id. The tree hangs every event under the event that caused it; ``--json`` prints
:meth:`tidings.CausalTrace.to_dict` instead.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import PurePosixPath
from typing import Annotated
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
import typer
from rich.console import Console, Group
from rich.text import Text
from rich.tree import Tree

from tidings.causal import CausalTrace, TraceNode, build_trace
from tidings.cli.runtime import DEFAULT_STORE, STORE_ENV, fail, open_existing, run
from tidings.errors import InvalidArgument
from tidings.store.base import EventStore

__all__ = ["parse_sources", "render_trace", "store_from_env", "trace"]

StoresOption = Annotated[
    list[str] | None,
    typer.Option(
        "--store",
        metavar="[NAME=]URL",
        help="A service's store (repeatable): URL, or NAME=URL to label its events with NAME. "
        f"Default: ${STORE_ENV}, then {DEFAULT_STORE}.",
        show_default=False,
    ),
]


def store_from_env() -> list[str]:
    """``$TIDINGS_STORE`` as one store URL (``[]`` when unset or blank). Read by hand: Click
    splits an option's environment variable on whitespace when the option is repeatable, which
    breaks a path with a space in it."""
    value = os.environ.get(STORE_ENV, "").strip()
    return [value] if value else []


def _label_of(url: str) -> str:
    """A short name for an unnamed store: its file's stem, PostgreSQL schema or database."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        stem = PurePosixPath(unquote(parts.path)).stem
        return stem or "sqlite"
    if parts.scheme in ("postgresql", "postgres"):
        schema = parse_qs(parts.query).get("schema")
        if schema:
            return schema[0]
        return parts.path.lstrip("/") or "postgres"
    return parts.scheme or "store"


def parse_sources(values: list[str]) -> dict[str, str]:
    """``--store`` values as label -> URL. ``NAME=URL`` names a store (NAME: letters, digits,
    ``_ . -``); a bare URL is named after its file, schema or database, made unique with ``-2``...
    Raises :class:`~tidings.InvalidArgument` for an empty value or a name given twice."""
    sources: dict[str, str] = {}
    for value in values:
        name, sep, url = value.partition("=")
        # A URL has "://" before any "=", so NAME=URL is told from a URL with "=" in its query.
        if sep and "://" not in name:
            if not name or not all(c.isalnum() or c in "_.-" for c in name):
                raise InvalidArgument(f"--store {value!r}: NAME must be letters, digits, '_', '.' or '-'")
            if name in sources:
                raise InvalidArgument(f"--store: the name {name!r} is given twice")
        else:
            url = value
            base = _label_of(url)
            name, n = base, 1
            while name in sources:
                n += 1
                name = f"{base}-{n}"
        if not url:
            raise InvalidArgument(f"--store {value!r} names no URL")
        sources[name] = url
    return sources


async def _trace(urls: dict[str, str], ref: str, limit: int) -> CausalTrace:
    async with contextlib.AsyncExitStack() as stack:
        stores: dict[str, EventStore] = {}
        for name, url in urls.items():
            stores[name] = await stack.enter_async_context(open_existing(url))
        return await build_trace(stores, ref, limit=limit)


def _label(node: TraceNode) -> Text:
    """One event: its type on the first line (folded, never cut, however narrow the terminal),
    then where it happened and what caused it, then its markers."""
    text = Text(overflow="fold")
    text.append(node.event_type, style="bold green" if not node.dead_lettered else "bold red")
    text.append("\n")
    text.append(node.service, style="cyan")
    text.append(" ")
    text.append(f"{node.stream_id}@{node.version}", style="magenta")
    if node.caused_by:
        text.append(" ")
        text.append(node.caused_by, style="blue")
    if node.since_parent_ms is not None:
        text.append(f" +{node.since_parent_ms:.1f}ms", style="dim")
    if node.compensation:
        text.append("\n")
        text.append("↺ compensation", style="yellow")
    for letter in node.dead_lettered:
        text.append("\n")
        text.append(
            f"✗ dead-lettered by {letter.group} after {letter.attempts} attempt"
            f"{'s' if letter.attempts != 1 else ''}: {letter.error.splitlines()[0] if letter.error else ''}",
            style="red",
        )
    return text


MIN_LABEL_WIDTH = 24
"""The narrowest a tree's labels get: deeper branches continue in a tree of their own."""

GUIDE_WIDTH = 4
"""The columns each level of a Rich tree indents by."""


def render_trace(trace: CausalTrace, width: int) -> Group:
    """The trace as Rich trees: one branch per event, under the event that caused it.

    On a terminal too narrow for the depth of the tree, a branch that would leave its labels
    less than :data:`MIN_LABEL_WIDTH` columns continues in a tree of its own below, headed by
    the event that caused it: every event is shown, none is cut off."""
    count = len(trace)
    services = ", ".join(trace.services)
    title = Text(overflow="fold")
    title.append(f"trace of {trace.ref}", style="bold")
    title.append(f"\n{count} event{'s' if count != 1 else ''} in {services}", style="dim")
    if trace.truncated:
        title.append("\n(truncated: raise --limit to see more)", style="yellow")
    main = Tree(title)
    trees = [main]
    max_depth = max(1, (width - MIN_LABEL_WIDTH) // GUIDE_WIDTH)
    # Where each event's branch is, and how deep it is drawn (the depth restarts in a continuation).
    branches: dict[str, tuple[Tree, int]] = {}
    for node, parent, _ in trace.walk():
        if parent is None:
            under, depth = main, 1
        else:
            under, depth = branches[parent.event_id]
            depth += 1
            if depth > max_depth:
                heading = Text(overflow="fold", style="dim")
                heading.append(f"⤷ continued: caused by {parent.event_type} {parent.event_id[:8]}")
                under = Tree(heading)
                trees.append(under)
                depth = 1
        branches[node.event_id] = (under.add(_label(node)), depth)
    return Group(*trees)


def trace(
    ref: Annotated[
        str,
        typer.Argument(metavar="REF", help="An event id, a correlation id or a stream id (order-123)."),
    ],
    store: StoresOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", metavar="", help="Print the trace as one JSON object.")
    ] = False,
    limit: Annotated[int, typer.Option(metavar="N", min=1, help="Gather at most this many events.")] = 10_000,
) -> None:
    """The causal tree of a business transaction across the services' stores."""
    try:
        sources = parse_sources(store or store_from_env() or [DEFAULT_STORE])
    except InvalidArgument as exc:
        fail(str(exc), code=2)
    found = run(_trace(sources, ref, limit))
    if json_output:
        typer.echo(orjson.dumps(found.to_dict()).decode())
        return
    console = Console()
    console.print(render_trace(found, console.width))
