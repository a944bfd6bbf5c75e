"""The limit: plain ``sqlite3`` writing exactly the rows tidings wrote, and nothing else.

The rows are read back from the database tidings just wrote in the same repetition (same ids,
timestamps, JSON bytes), so the comparison holds whatever tidings puts in them. The table is created
by tidings itself, so its shape and indexes are exactly ``tidings_events``; the connection uses the
same pragmas as tidings' connections. Only the transactions are timed: no validation, no encoding,
no version checks, no threads.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, Final

from benchmarks.harness import sqlite_url, stopwatch
from tidings import open_store

PRAGMAS: Final = (
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA cache_size = -65536",
)
"""The pragmas tidings' SQLite backend sets on its connections (durable by default)."""

_COLUMNS: Final = (
    "position, stream_id, version, event_id, event_type, schema_version, timestamp, data, metadata"
)
_INSERT: Final = f"INSERT INTO tidings_events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"

Row = tuple[Any, ...]


def stored_rows(path: Path) -> list[Row]:
    """Every row of a tidings SQLite store, in position order."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"SELECT {_COLUMNS} FROM tidings_events ORDER BY position").fetchall()


async def _create_schema(path: Path) -> None:
    async with open_store(sqlite_url(path)):
        pass


@contextmanager
def _fresh_table(path: Path) -> Iterator[sqlite3.Connection]:
    asyncio.run(_create_schema(path))
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for pragma in PRAGMAS:
            conn.execute(pragma)
        yield conn


def executemany(path: Path, rows: Sequence[Row]) -> float:
    """Insert ``rows`` into a fresh table at ``path`` in one transaction; return the seconds taken."""
    return executemany_per_call(path, rows, len(rows))


def executemany_per_call(path: Path, rows: Sequence[Row], per_call: int) -> float:
    """Insert ``rows`` into a fresh table, one transaction per ``per_call`` rows; seconds taken."""
    with _fresh_table(path) as conn, stopwatch() as elapsed:
        for start in range(0, len(rows), per_call):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(_INSERT, rows[start : start + per_call])
            conn.execute("COMMIT")
    return elapsed()


def load_decoded(
    path: Path, stream_id: str, decoders: dict[str, Callable[[bytes], Any]], apply: Callable[[Any], None]
) -> float:
    """Read one stream's rows with plain ``sqlite3`` (same pragmas), decode each with its model's
    JSON validator and hand it to ``apply``, in pages of 1000 as tidings reads; seconds taken.

    The floor of an aggregate load: the same reads and the same pydantic decoding, without the
    store's envelope, version checks, threads or event loop."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        for pragma in PRAGMAS:
            conn.execute(pragma)
        conn.execute(_SELECT_STREAM, (stream_id, 0)).fetchall()  # warm-up, as for the others
        with stopwatch() as elapsed:
            after = 0
            while True:
                rows = conn.execute(_SELECT_STREAM, (stream_id, after)).fetchall()
                for _version, event_type, data in rows:
                    apply(decoders[event_type](data))
                if len(rows) < 1000:
                    break
                after = rows[-1][0]
        return elapsed()


_SELECT_STREAM: Final = (
    "SELECT version, event_type, data FROM tidings_events WHERE stream_id = ? AND version > ? "
    "ORDER BY version LIMIT 1000"
)
