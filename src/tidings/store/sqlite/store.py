"""The embedded default: an event store in one SQLite file (``sqlite:///path.db``).

Threads, not the event loop, touch SQLite: one writer thread (:mod:`tidings.store.sqlite.writer`)
performs every write in group commits, and a small pool of **reader threads** with their own
connections serves reads; WAL mode lets them run while the writer commits.

Durability: ``synchronous=FULL`` by default (a committed append survives power loss). Add
``?synchronous=normal`` to the URL to trade the last transactions on power loss (never on a
process crash) for faster commits.

``?mode=ro`` opens an existing store read-only: reads work, writes raise
:class:`~tidings.StatementError`. A file that is not a tidings store is refused before anything
in it changes (its journal mode included); see :class:`~tidings.store.sqlite.SQLiteConfig`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

from tidings.errors import InvalidArgument, StatementError, StoreClosed, TidingsError
from tidings.events import EventRegistry
from tidings.store.append import AppendRequest, AppendResult
from tidings.store.base import Row, Snapshot, StreamInfo, now_micros
from tidings.store.sqlite.config import SQLiteConfig, check_location, connect
from tidings.store.sqlite.errors import BINDING_ERRORS, translate
from tidings.store.sqlite.schema import CORRELATION, ROW_COLUMNS
from tidings.store.sqlite.tx import SQLiteTx, commit_processed_in, dead_letter_from_row
from tidings.store.sqlite.writer import SQLiteStatistics, SQLiteWriter, WriteJob, append_in
from tidings.store.tracking import (
    DeadLetter,
    DeadLetterQuery,
    ProcessedBatch,
    SQLStore,
    Tx,
    dead_letter_filter,
)

__all__ = ["SQLiteStore"]

T = TypeVar("T")

_READERS: Final = 2
_RECENT_ROWS: Final = 4096
"""Rows of this store's latest appends kept in memory for live subscribers (read_recent)."""


class SQLiteStore(SQLStore):
    """A :class:`~tidings.store.SQLStore` in a SQLite file, with group commit.

    Several processes may open the same file: SQLite's file lock serialises their writes and
    positions stay gap-free. Appends made in this process wake its subscribers at once; appends by
    other processes are noticed through ``PRAGMA data_version`` by a cheap poll.
    """

    def __init__(self, url: str, *, registry: EventRegistry | None = None) -> None:
        super().__init__(url, registry=registry)
        self.config = SQLiteConfig.from_url(url)
        self._writer = SQLiteWriter(self.config, name=f"tidings-sqlite-writer:{url}")
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_conns: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._watcher: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._conns_lock = threading.Lock()
        # The rows of this store's latest appends, consecutive positions only: the writer hands
        # them over after each commit, and a live subscriber reads them without a database trip.
        self._recent: list[Row] = []

    # -- connections ------------------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self.config)
            conn.execute("PRAGMA query_only = 1")
            # Pages live in the OS cache anyway; a big private cache per reader would hold the
            # same pages twice and make a long scan's RSS grow to twice that size.
            conn.execute("PRAGMA cache_size = -8192")
            self._local.conn = conn
            with self._conns_lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        assert self._readers is not None
        loop = asyncio.get_running_loop()

        def run() -> T:
            try:
                return fn(self._reader())
            except (OverflowError, UnicodeEncodeError) as exc:
                # A parameter SQLite cannot hold (an int beyond 64 bits, text with a lone surrogate).
                raise InvalidArgument(f"a value cannot be passed to SQLite: {exc}") from exc
            except (sqlite3.Error, *BINDING_ERRORS) as exc:
                raise translate(exc, self.config.path) from exc

        try:
            return await loop.run_in_executor(self._readers, run)
        except RuntimeError as exc:  # the executor was shut down: the store closed meanwhile
            if self._closed:
                raise StoreClosed(f"store {self.safe_url} is closed") from exc
            raise

    async def write(
        self, fn: WriteJob[T], *, _request: AppendRequest | None = None, _keeps_log: bool = False
    ) -> T:
        """Run ``fn(conn)`` on the writer thread inside a savepoint of the next group commit.

        The result is returned once the transaction holding it has committed. If ``fn`` raises,
        its savepoint is rolled back (other jobs of the batch commit) and the error is re-raised
        here. Used by appends and by processing code that must commit with a checkpoint.
        """
        self._check_open()
        if self.config.read_only:
            raise StatementError(f"store {self.safe_url} is opened read-only (mode=ro): writes are refused")
        # Arbitrary SQL may rewrite stored events (a repair, a test's corruption): the rows kept
        # for live subscribers are forgotten after it. The store's own writes never change them.
        return await self._writer.submit(fn, _request, keeps_log=_keeps_log or _request is not None)

    # -- lifecycle ------------------------------------------------------------------------------

    async def _open(self) -> None:
        check_location(self.config)
        await self._writer.start(self._committed)
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=_READERS, thread_name_prefix="tidings-sqlite-reader"
        )
        self._watcher = threading.Thread(
            target=self._watch_other_writers,
            args=(asyncio.get_running_loop(),),
            name="tidings-sqlite-watch",
            daemon=True,
        )
        self._watcher.start()

    async def _close(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.join)
        await self._writer.stop()
        if self._readers is not None:
            await asyncio.to_thread(self._readers.shutdown, wait=True)
        with self._conns_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    def _watch_other_writers(self, loop: asyncio.AbstractEventLoop) -> None:
        """Thread: notice commits made by other processes (``PRAGMA data_version``), wake waiters.

        Writes through this store wake waiters directly; this only covers other connections, so
        a slow interval is fine. data_version counts commits by *other* connections, per
        connection, so the watch keeps one connection of its own, used by this thread alone.
        """
        try:
            conn = connect(self.config)
        except TidingsError:
            return  # the store could not open either; its own error is what the caller sees
        try:
            last: int | None = None
            while not self._watch_stop.wait(0.05):
                try:
                    version = int(conn.execute("PRAGMA data_version").fetchone()[0])
                except sqlite3.Error:
                    continue
                if last is not None and version != last:
                    with contextlib.suppress(RuntimeError):  # the loop may be closing
                        loop.call_soon_threadsafe(self._notify_appended)
                last = version
        finally:
            conn.close()

    def _committed(self, head: int | None, rows: list[Row], forget: bool, wake: bool) -> None:
        """On the store's loop after each commit of the writer: remember its appended rows, then
        wake the waiters with the head they reached if it may have moved (``wake``).
        ``forget``: the commit ran arbitrary SQL."""
        if forget:
            # It may have changed any row, even one appended in the same commit.
            self._recent = []
        elif rows:
            recent = self._recent
            # Keep only a run of consecutive positions: rows other jobs or processes wrote in
            # between are not here, so what precedes a jump cannot be trusted to be complete.
            start = len(rows) - 1
            while start > 0 and rows[start - 1][0] == rows[start][0] - 1:
                start -= 1
            if start == 0 and recent and recent[-1][0] == rows[0][0] - 1:
                recent.extend(rows)
            else:
                recent = self._recent = rows[start:]
            if len(recent) > _RECENT_ROWS:
                del recent[: len(recent) - _RECENT_ROWS]
        if wake:
            self._notify_appended(head)

    def _recent_rows(self, after: int, upto: int) -> list[Row] | None:
        recent = self._recent
        if not recent or upto <= after:
            return None
        first = recent[0][0]
        if after + 1 < first or upto > recent[-1][0]:
            return None
        return recent[after + 1 - first : upto + 1 - first]

    # -- primitives -------------------------------------------------------------------------------

    async def _append(self, request: AppendRequest) -> AppendResult:
        return await self.write(lambda conn: append_in(conn, request), _request=request)

    async def _fetch_stream(
        self, stream_id: str, after: int, before: int | None, backwards: bool, limit: int
    ) -> list[Row]:
        sql = f"SELECT {ROW_COLUMNS} FROM tidings_events WHERE stream_id = ? AND version > ?"
        params: list[Any] = [stream_id, after]
        if before is not None:
            sql += " AND version < ?"
            params.append(before)
        sql += f" ORDER BY version {'DESC' if backwards else 'ASC'} LIMIT ?"
        params.append(limit)
        return await self._read(lambda c: c.execute(sql, params).fetchall())

    async def _fetch_stream_data(self, stream_id: str, after: int, limit: int) -> list[tuple[Any, ...]]:
        # Five columns, not nine: a replay needs no ids, timestamps or metadata, and every
        # column costs the driver an object per row.
        return await self._read(
            lambda c: c.execute(
                "SELECT position, version, event_type, schema_version, data FROM tidings_events "
                "WHERE stream_id = ? AND version > ? ORDER BY version LIMIT ?",
                (stream_id, after, limit),
            ).fetchall()
        )

    async def _fetch_all(
        self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int
    ) -> tuple[list[Row], int | None]:
        sql = f"SELECT {ROW_COLUMNS} FROM tidings_events WHERE position > ?"
        params: list[Any] = [after]
        if types is not None:
            sql += f" AND event_type IN ({', '.join('?' * len(types))})"
            params.extend(types)
        if prefix is not None:
            # substr() compares exactly; LIKE would treat % and _ in the prefix as wildcards.
            sql += " AND substr(stream_id, 1, ?) = ?"
            params.extend((len(prefix), prefix))
        sql += " ORDER BY position LIMIT ?"
        params.append(limit)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return rows, (rows[-1][0] if len(rows) == limit else None)

    async def _fetch_correlated(
        self, ids: tuple[str, ...], event_ids: tuple[uuid.UUID, ...], after: int, limit: int
    ) -> list[Row]:
        # Positions from the two indexes (correlation expression, event id), then rows by rowid:
        # an OR in one WHERE could make the planner walk the log in position order instead.
        # "position > ?" inside each: the correlation index holds the rowid (the position), so a
        # later page starts where the previous one ended instead of collecting the conversation.
        marks = ", ".join("?" * len(ids))
        sql = (
            f"SELECT {ROW_COLUMNS} FROM tidings_events WHERE position IN ("
            f"SELECT position FROM tidings_events WHERE metadata IS NOT NULL AND {CORRELATION} IN ({marks}) "
            "AND position > ?"
        )
        params: list[Any] = [*ids, after]
        if event_ids:
            id_marks = ", ".join("?" * len(event_ids))
            sql += (
                f" UNION SELECT position FROM tidings_events WHERE event_id IN ({id_marks}) AND position > ?"
            )
            params.extend(e.bytes for e in event_ids)
            params.append(after)
        sql += ") ORDER BY position LIMIT ?"
        params.append(limit)
        return await self._read(lambda c: c.execute(sql, params).fetchall())

    async def _stream_version(self, stream_id: str) -> int:
        return await self._read(lambda c: _version_of(c, stream_id))

    async def _head(self) -> int:
        return await self._read(_head_of)

    async def _list_streams(self, prefix: str | None, after: str | None, limit: int) -> list[StreamInfo]:
        sql = "SELECT stream_id, max(version), max(position) FROM tidings_events WHERE 1"
        params: list[Any] = []
        if after is not None:
            sql += " AND stream_id > ?"
            params.append(after)
        if prefix is not None:
            sql += " AND substr(stream_id, 1, ?) = ?"
            params.extend((len(prefix), prefix))
        sql += " GROUP BY stream_id ORDER BY stream_id LIMIT ?"
        params.append(limit)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [StreamInfo(r[0], r[1], r[2]) for r in rows]

    async def _version_at(self, stream_id: str, micros: int) -> int:
        def query(c: sqlite3.Connection) -> int:
            row = c.execute(
                "SELECT max(version) FROM tidings_events WHERE stream_id = ? AND timestamp <= ?",
                (stream_id, micros),
            ).fetchone()
            return int(row[0] or 0)

        return await self._read(query)

    async def _save_snapshot(self, snapshot: Snapshot) -> None:
        def save(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO tidings_snapshots "
                "(stream_id, version, aggregate_type, schema, state) VALUES (?, ?, ?, ?, ?)",
                (
                    snapshot.stream_id,
                    snapshot.version,
                    snapshot.aggregate_type,
                    snapshot.schema,
                    snapshot.state,
                ),
            )

        await self.write(save, _keeps_log=True)

    async def _load_snapshot(self, stream_id: str, max_version: int | None) -> Snapshot | None:
        def load(c: sqlite3.Connection) -> Snapshot | None:
            row = c.execute(
                "SELECT stream_id, version, aggregate_type, schema, state FROM tidings_snapshots "
                "WHERE stream_id = ? AND version <= ? ORDER BY version DESC LIMIT 1",
                (stream_id, max_version if max_version is not None else 2**62),
            ).fetchone()
            return None if row is None else Snapshot(row[0], row[1], row[2], row[3], bytes(row[4]))

        return await self._read(load)

    def statistics(self) -> SQLiteStatistics:
        """The writer's counters (read without locking: a snapshot, possibly a little stale)."""
        return self._writer.statistics()

    def database_identity(self) -> str:
        return f"sqlite:{os.path.realpath(self.config.path)}"

    # -- processing records ----------------------------------------------------------------------

    async def _load_checkpoint(self, group: str) -> int:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT position FROM tidings_checkpoints WHERE group_name = ?", (group,)
            ).fetchall()
        )
        return int(rows[0][0]) if rows else 0

    async def _checkpoints(self) -> dict[str, int]:
        rows = await self._read(
            lambda c: c.execute("SELECT group_name, position FROM tidings_checkpoints").fetchall()
        )
        return {r[0]: int(r[1]) for r in rows}

    async def _set_checkpoint(self, group: str, position: int | None) -> None:
        def run(conn: sqlite3.Connection) -> None:
            if position is None:
                conn.execute("DELETE FROM tidings_checkpoints WHERE group_name = ?", (group,))
                conn.execute("DELETE FROM tidings_inbox WHERE group_name = ?", (group,))
            else:
                conn.execute(
                    "INSERT INTO tidings_checkpoints (group_name, position, updated_at) "
                    "VALUES (?, ?, ?) ON CONFLICT (group_name) DO UPDATE SET "
                    "position = excluded.position, updated_at = excluded.updated_at",
                    (group, position, now_micros()),
                )

        await self.write(run, _keeps_log=True)

    async def _commit_processed(self, batch: ProcessedBatch) -> list[AppendResult]:
        # Processing commits (checkpoints, inbox, a handler's statements and appends) are taken to
        # leave stored events alone: the log is append-only, and a live subscriber's memory of
        # the latest appends must survive the commits that follow each of them.
        return await self.write(
            lambda conn: commit_processed_in(conn, batch, self.config.path), _keeps_log=True
        )

    async def _processed_ids(self, group: str, event_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        def query(c: sqlite3.Connection) -> set[uuid.UUID]:
            found: set[uuid.UUID] = set()
            for start in range(0, len(event_ids), 500):
                chunk = [e.bytes for e in event_ids[start : start + 500]]
                rows = c.execute(
                    "SELECT event_id FROM tidings_inbox WHERE group_name = ? AND event_id IN "
                    f"({', '.join('?' * len(chunk))})",
                    [group, *chunk],
                ).fetchall()
                found.update(uuid.UUID(bytes=bytes(r[0])) for r in rows)
            return found

        return await self._read(query)

    async def _dead_letters(
        self, group: str | None, id: int | None, query: DeadLetterQuery | None = None
    ) -> list[DeadLetter]:
        sql = (
            "SELECT id, group_name, position, event_id, stream_id, event_type, error, traceback, "
            "attempts, failed_at FROM tidings_dead_letters WHERE 1"
        )
        conditions, params = dead_letter_filter(group, id, "?", query)
        sql += conditions + " ORDER BY id"
        if query is not None and query.limit is not None:
            sql += f" LIMIT {int(query.limit)}"
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [dead_letter_from_row(r) for r in rows]

    async def _count_dead_letters(self, group: str | None) -> int:
        conditions, params = dead_letter_filter(group, None, "?")
        sql = "SELECT count(*) FROM tidings_dead_letters WHERE 1" + conditions
        return int(await self._read(lambda c: c.execute(sql, params).fetchone()[0]))

    def _dead_letter_event_id(self, event_id: uuid.UUID) -> Any:
        return event_id.bytes

    async def _discard_dead_letter(self, id: int) -> bool:
        return await self.write(
            lambda c: c.execute("DELETE FROM tidings_dead_letters WHERE id = ?", (id,)).rowcount > 0,
            _keeps_log=True,
        )

    async def _transaction(self, fn: Callable[[Tx], T]) -> T:
        return await self.write(lambda conn: fn(SQLiteTx(conn, self.config.path)))

    async def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return await self._read(lambda c: c.execute(sql, params).fetchall())


def _version_of(conn: sqlite3.Connection, stream_id: str) -> int:
    row = conn.execute(
        "SELECT version FROM tidings_events WHERE stream_id = ? ORDER BY version DESC LIMIT 1",
        (stream_id,),
    ).fetchone()
    return 0 if row is None else int(row[0])


def _head_of(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(position) FROM tidings_events").fetchone()
    return int(row[0] or 0)
