"""Rendering: Rich tables and lines for people, JSON lines for scripts.

The JSON objects are the scripting interface, so their keys are stable: an event is
``{"position", "stream_id", "version", "event_type", "schema_version", "event_id", "timestamp",
"data", "metadata"}`` and a stream ``{"stream_id", "version", "position"}``. ``data`` is the
typed event dumped in JSON mode, or the stored dict as-is for a type with no registered class.
"""

from __future__ import annotations

import sys
from datetime import UTC
from typing import Any

import orjson
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tidings.events import RawEvent, RecordedEvent
from tidings.store import StreamInfo

__all__ = [
    "EventLines",
    "EventTable",
    "JsonLines",
    "StreamTable",
    "event_data",
    "event_json",
    "stream_json",
]


def event_data(recorded: RecordedEvent) -> dict[str, Any]:
    """The event's data as JSON-ready values, whether it was decoded or read raw."""
    event = recorded.event
    if isinstance(event, RawEvent):
        return event.data
    return event.model_dump(mode="json")


def event_json(recorded: RecordedEvent) -> dict[str, Any]:
    """The JSON object printed for an event by ``--json``."""
    return {
        "position": recorded.position,
        "stream_id": recorded.stream_id,
        "version": recorded.version,
        "event_type": recorded.event_type,
        "schema_version": recorded.schema_version,
        "event_id": str(recorded.event_id),
        "timestamp": recorded.timestamp.isoformat(),
        "data": event_data(recorded),
        "metadata": dict(recorded.metadata),
    }


def stream_json(info: StreamInfo) -> dict[str, Any]:
    """The JSON object printed for a stream by ``--json``."""
    return {"stream_id": info.stream_id, "version": info.version, "position": info.position}


def _compact(data: dict[str, Any]) -> str:
    return orjson.dumps(data).decode()


def _when(recorded: RecordedEvent) -> str:
    return recorded.timestamp.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


class JsonLines:
    """Writes one JSON object per line to stdout, flushed at once (``--follow`` feeds pipes)."""

    def add(self, value: dict[str, Any]) -> None:
        sys.stdout.write(orjson.dumps(value).decode() + "\n")
        sys.stdout.flush()


class EventTable:
    """Collects events and prints them as one table on :meth:`finish` (or a note if there are none)."""

    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title
        self.count = 0
        self.table = Table(
            title=Text(title),
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        # Numbers and instants never wrap; ids and data fold, and keep enough room to be read.
        self.table.add_column("Pos", justify="right", style="cyan", no_wrap=True)
        self.table.add_column("Stream", style="magenta", overflow="fold", min_width=8)
        self.table.add_column("Ver", justify="right", no_wrap=True)
        self.table.add_column("Type", style="green", overflow="fold", min_width=8)
        self.table.add_column("Time (UTC)", style="dim", no_wrap=True)
        self.table.add_column("Data", overflow="fold", min_width=16)

    def add(self, recorded: RecordedEvent) -> None:
        self.count += 1
        self.table.add_row(
            str(recorded.position),
            Text(recorded.stream_id),
            str(recorded.version),
            Text(recorded.event_type),
            _when(recorded),
            Text(_compact(event_data(recorded))),
        )

    def finish(self) -> None:
        if self.count:
            self.console.print(self.table)
        else:
            self.console.print(Text(f"{self.title}: no events", style="dim"))


class EventLines:
    """Prints each event as one line as soon as it arrives (``--follow`` without ``--json``)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def add(self, recorded: RecordedEvent) -> None:
        line = Text.assemble(
            (f"{recorded.position:>8}", "cyan"),
            "  ",
            (_when(recorded), "dim"),
            "  ",
            (recorded.stream_id, "magenta"),
            f"@{recorded.version}  ",
            (recorded.event_type, "green"),
            "  ",
            _compact(event_data(recorded)),
        )
        self.console.print(line, soft_wrap=True)


class StreamTable:
    """Collects streams and prints them as one table on :meth:`finish` (or a note if there are none)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.count = 0
        self.table = Table(
            title="Streams", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True
        )
        self.table.add_column("Stream", style="magenta")
        self.table.add_column("Version", justify="right")
        self.table.add_column("Last position", justify="right", style="cyan")

    def add(self, info: StreamInfo) -> None:
        self.count += 1
        self.table.add_row(Text(info.stream_id), str(info.version), str(info.position))

    def finish(self) -> None:
        if self.count:
            self.table.caption = f"{self.count} stream{'s' if self.count != 1 else ''}"
            self.console.print(self.table)
        else:
            self.console.print(Text("no streams", style="dim"))
