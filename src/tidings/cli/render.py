"""Rendering: Rich tables and lines for people, JSON lines for scripts.

The JSON objects are the scripting interface, so their keys are stable: an event is
``{"position", "stream_id", "version", "event_type", "schema_version", "event_id", "timestamp",
"data", "metadata"}`` and a stream ``{"stream_id", "version", "position"}``. ``data`` is the
typed event dumped in JSON mode, or the stored dict as-is for a type with no registered class.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from datetime import UTC
from typing import Any, Literal, NamedTuple

import orjson
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from tidings.events import RawEvent, RecordedEvent
from tidings.store import StreamInfo

__all__ = [
    "Column",
    "EventLines",
    "EventTable",
    "JsonLines",
    "Records",
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


class Column(NamedTuple):
    """A column of a :class:`Records` listing.

    ``kind`` decides how a cell may be laid out: an ``"id"`` (a stream, group, type name) and a
    ``"number"`` are never cut or split across lines; ``"text"`` (data, an error) folds.
    """

    header: str
    kind: Literal["id", "number", "text"] = "text"
    style: str | None = None


TEXT_MIN_WIDTH = 16
"""The narrowest a folding text column gets before a listing switches to the vertical layout."""


class Records:
    """Rows printed on :meth:`finish` as one table if it fits the terminal, else vertically.

    The table keeps every id and number whole (``no_wrap``); only text columns fold. When even
    that does not fit (a narrow terminal, long ids), each row is printed as a block of
    ``header: value`` lines instead, written without line breaks inside a value, so an id is
    never split (the terminal may still wrap a long line visually; copying it gives it whole).
    """

    def __init__(
        self, console: Console, title: str, columns: Sequence[Column], *, empty: str = "nothing"
    ) -> None:
        self.console = console
        self.title = title
        self.columns = tuple(columns)
        self.empty = empty
        self.caption: str | None = None
        self.rows: list[tuple[str, ...]] = []

    def add(self, *cells: str) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(self.columns)} cells expected, got {len(cells)}")
        self.rows.append(cells)

    def __len__(self) -> int:
        return len(self.rows)

    def finish(self) -> None:
        if not self.rows:
            self.console.print(Text(f"{self.title}: {self.empty}", style="dim"))
        elif self._table_width() <= self.console.width:
            self.console.print(self._table(self.rows))
        else:
            self._print_vertical()

    def _table(self, rows: Iterable[tuple[str, ...]]) -> Table:
        table = Table(
            title=Text(self.title),
            title_justify="left",
            caption=self.caption,
            caption_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
            collapse_padding=True,
        )
        for column in self.columns:
            if column.kind == "text":
                table.add_column(column.header, style=column.style, overflow="fold", min_width=TEXT_MIN_WIDTH)
            else:
                justify: Literal["left", "right"] = "right" if column.kind == "number" else "left"
                table.add_column(column.header, style=column.style, no_wrap=True, justify=justify)
        for row in rows:
            table.add_row(*(Text(cell) for cell in row))
        return table

    def _table_width(self) -> int:
        """The width the table needs with its ids whole and its text columns at their narrowest."""
        narrowest = [
            tuple(
                cell[:TEXT_MIN_WIDTH] if column.kind == "text" else cell
                for column, cell in zip(self.columns, row, strict=True)
            )
            for row in self.rows
        ]
        unbounded = self.console.options.update(max_width=1_000_000)
        return Measurement.get(self.console, unbounded, self._table(narrowest)).maximum

    def _print_vertical(self) -> None:
        self.console.print(Text(self.title, style="bold"))
        width = max(len(column.header) for column in self.columns)
        for index, row in enumerate(self.rows):
            if index:
                self.console.print()
            for column, cell in zip(self.columns, row, strict=True):
                line = Text.assemble((f"{column.header:<{width}}  ", "dim"), (cell, column.style or ""))
                self.console.print(line, soft_wrap=True)
        if self.caption:
            self.console.print(Text(self.caption, style="dim"))


class EventTable:
    """Collects events and prints them on :meth:`finish` (see :class:`Records`)."""

    def __init__(self, console: Console, title: str) -> None:
        self.records = Records(
            console,
            title,
            [
                Column("Pos", "number", "cyan"),
                Column("Stream", "id", "magenta"),
                Column("Ver", "number"),
                Column("Type", "id", "green"),
                Column("Time (UTC)", "id", "dim"),
                Column("Data"),
            ],
            empty="no events",
        )

    @property
    def count(self) -> int:
        return len(self.records)

    def add(self, recorded: RecordedEvent) -> None:
        self.records.add(
            str(recorded.position),
            recorded.stream_id,
            str(recorded.version),
            recorded.event_type,
            _when(recorded),
            _compact(event_data(recorded)),
        )

    def finish(self) -> None:
        self.records.finish()


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
    """Collects streams and prints them on :meth:`finish` (see :class:`Records`)."""

    def __init__(self, console: Console) -> None:
        self.records = Records(
            console,
            "Streams",
            [
                Column("Stream", "id", "magenta"),
                Column("Version", "number"),
                Column("Last position", "number", "cyan"),
            ],
            empty="no streams",
        )

    def add(self, info: StreamInfo) -> None:
        self.records.add(info.stream_id, str(info.version), str(info.position))

    def finish(self) -> None:
        count = len(self.records)
        self.records.caption = f"{count} stream{'s' if count != 1 else ''}"
        self.records.finish()
