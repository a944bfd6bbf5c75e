"""The embedded default: an event store in one SQLite file (``sqlite:///path.db``).

Threads, not the event loop, touch SQLite:

* one **writer thread** owns the only writing connection. Every write (append, snapshot,
  checkpoint, a projection's batch) is a *job* queued to it. The writer takes every job that is
  waiting, runs each inside its own SAVEPOINT of one shared transaction, and commits once: this is
  **group commit**. A job that fails is rolled back to its savepoint alone, so per-call atomicity
  and per-call errors survive the batching, while sixteen concurrent appenders pay for one fsync.
* a small pool of **reader threads** with their own connections serves reads; WAL mode lets them
  run while the writer commits.

Global positions are assigned by the writer inside its write transaction (``BEGIN IMMEDIATE``
serialises writers across processes too), so positions commit in order and the log has no gaps.

Durability: ``synchronous=FULL`` by default (a committed append survives power loss). Add
``?synchronous=normal`` to the URL to trade the last transactions on power loss (never on a
process crash) for faster commits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from tidings.errors import (
    CheckpointConflict,
    CorruptStore,
    InvalidArgument,
    StoreClosed,
    StoreError,
    TidingsError,
)
from tidings.events import EventRegistry, datetime_from_micros
from tidings.store.base import (
    AppendRequest,
    AppendResult,
    EventStore,
    Row,
    Snapshot,
    StreamInfo,
    now_micros,
)
from tidings.store.records import DeadLetter, ProcessedBatch, Tx, dead_letter_filter

__all__ = ["SQLiteConfig", "SQLiteStatistics", "SQLiteStore", "WriteJob"]

SCHEMA_VERSION: Final = 1
"""Version of the on-disk schema, stored in ``tidings_meta``; bumped by migrations."""

T = TypeVar("T")

WriteJob = Callable[[sqlite3.Connection], T]
"""A unit of work for the writer thread; it runs inside its own savepoint of a group commit."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tidings_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_events (
    position       INTEGER PRIMARY KEY,
    stream_id      TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    event_id       BLOB    NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    timestamp      INTEGER NOT NULL,
    data           BLOB    NOT NULL,
    metadata       BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS tidings_events_stream ON tidings_events (stream_id, version);
CREATE UNIQUE INDEX IF NOT EXISTS tidings_events_id ON tidings_events (event_id);
CREATE TABLE IF NOT EXISTS tidings_snapshots (
    stream_id      TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    aggregate_type TEXT    NOT NULL,
    schema         TEXT    NOT NULL,
    state          BLOB    NOT NULL,
    PRIMARY KEY (stream_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_checkpoints (
    group_name TEXT    PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_inbox (
    group_name TEXT NOT NULL,
    event_id   BLOB NOT NULL,
    position   INTEGER NOT NULL,
    PRIMARY KEY (group_name, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_projections (
    name       TEXT    PRIMARY KEY,
    generation INTEGER NOT NULL,
    building   INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_dead_letters (
    id          INTEGER PRIMARY KEY,
    group_name  TEXT    NOT NULL,
    position    INTEGER NOT NULL,
    event_id    BLOB    NOT NULL,
    stream_id   TEXT    NOT NULL,
    event_type  TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    traceback   TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    failed_at   INTEGER NOT NULL,
    UNIQUE (group_name, event_id)
);
"""

_ROW_COLUMNS = "position, stream_id, version, event_id, event_type, schema_version, timestamp, data, metadata"
_MAX_BATCH_JOBS = 512
_READERS = 2


@dataclasses.dataclass(frozen=True, slots=True)
class SQLiteConfig:
    """Options of the SQLite backend, read from the URL's query string.

    ``synchronous``: ``full`` (default, durable on power loss) or ``normal`` (durable on process
    crash; the last commits may be lost on power loss). ``busy_timeout`` in milliseconds bounds how
    long a write waits for another process holding the file's write lock.
    """

    path: str
    synchronous: str = "full"
    busy_timeout: int = 10_000

    @classmethod
    def from_url(cls, url: str) -> SQLiteConfig:
        parts = urlsplit(url)
        if parts.scheme != "sqlite":
            raise InvalidArgument(f"not a sqlite URL: {url!r}")
        # sqlite:///rel.db -> "rel.db"; sqlite:////abs/x.db -> "/abs/x.db"
        raw = unquote(parts.netloc + parts.path)
        path = raw[1:] if raw.startswith("/") else raw
        if not path or path == ":memory:":
            raise InvalidArgument(
                f"{url!r}: give the database file, e.g. sqlite:///tidings.db (use memory:// for a "
                "store that is not kept)"
            )
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - {"synchronous", "busy_timeout"}
        if unknown:
            raise InvalidArgument(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        sync = options.get("synchronous", "full").lower()
        if sync not in ("full", "normal"):
            raise InvalidArgument(f"{url!r}: synchronous must be 'full' or 'normal', not {sync!r}")
        try:
            busy = int(options.get("busy_timeout", "10000"))
        except ValueError:
            raise InvalidArgument(f"{url!r}: busy_timeout must be milliseconds") from None
        return cls(path=path, synchronous=sync, busy_timeout=busy)


@dataclasses.dataclass(frozen=True, slots=True)
class SQLiteStatistics:
    """Counters of one store's writer thread since it was opened (``SQLiteStore.statistics()``).

    ``transactions``: group commits; ``jobs``: writes they carried (appends, checkpoints ...);
    ``appends`` / ``events``: append calls and their events; ``queued``: writes waiting now.
    ``jobs / transactions`` is the group-commit factor.
    """

    transactions: int
    jobs: int
    appends: int
    events: int
    queued: int


class _Job:
    __slots__ = ("fn", "future", "loop", "request")

    def __init__(
        self,
        fn: WriteJob[Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        request: AppendRequest | None = None,
    ) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop
        self.request = request  # set for appends, which the writer can merge


def _settle_all(
    settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]], notify: Callable[[], None] | None
) -> None:
    for future, result, error in settled:
        _settle(future, result, error)
    if notify is not None:
        notify()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the job's outcome stands regardless
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class SQLiteStore(EventStore):
    """An :class:`~tidings.store.EventStore` in a SQLite file, with group commit.

    Several processes may open the same file: SQLite's file lock serialises their writes and
    positions stay gap-free. Appends made in this process wake its subscribers at once; appends by
    other processes are noticed through ``PRAGMA data_version`` by a cheap poll.
    """

    def __init__(self, url: str, *, registry: EventRegistry | None = None) -> None:
        super().__init__(url, registry=registry)
        self.config = SQLiteConfig.from_url(url)
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: concurrent.futures.ThreadPoolExecutor | None = None
        self._reader_conns: list[sqlite3.Connection] = []
        self._local = threading.local()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: threading.Thread | None = None
        self._watch_stop = threading.Event()
        self._conns_lock = threading.Lock()
        self._transactions = 0
        self._jobs_done = 0
        self._appends = 0
        self._events = 0

    # -- connections ------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.config.path, isolation_level=None, check_same_thread=False, timeout=0)
            conn.execute(f"PRAGMA busy_timeout = {self.config.busy_timeout}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.config.synchronous.upper()}")
            conn.execute("PRAGMA cache_size = -65536")
        except sqlite3.DatabaseError as exc:
            raise CorruptStore(f"{self.config.path!r} is not a usable SQLite database: {exc}") from exc
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
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
            except sqlite3.Error as exc:
                raise _translate(exc, self.config.path) from exc

        try:
            return await loop.run_in_executor(self._readers, run)
        except RuntimeError as exc:  # the executor was shut down: the store closed meanwhile
            if self._closed:
                raise StoreClosed(f"store {self.safe_url} is closed") from exc
            raise

    async def write(self, fn: WriteJob[T], *, _request: AppendRequest | None = None) -> T:
        """Run ``fn(conn)`` on the writer thread inside a savepoint of the next group commit.

        The result is returned once the transaction holding it has committed. If ``fn`` raises,
        its savepoint is rolled back (other jobs of the batch commit) and the error is re-raised
        here. Used by appends and by processing code that must commit with a checkpoint.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, future, loop, _request))
        return await future

    # -- lifecycle ------------------------------------------------------------------------------

    async def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
        parent = Path(self.config.path).parent
        if not parent.exists():
            raise StoreError(f"cannot open {self.config.path!r}: directory {parent} does not exist")
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._writer = threading.Thread(
            target=self._writer_main,
            args=(ready,),
            name=f"tidings-sqlite-writer:{self.url}",
            daemon=True,
        )
        self._writer.start()
        await asyncio.wrap_future(ready)
        self._readers = concurrent.futures.ThreadPoolExecutor(
            max_workers=_READERS, thread_name_prefix="tidings-sqlite-reader"
        )
        self._watcher = threading.Thread(
            target=self._watch_other_writers, name="tidings-sqlite-watch", daemon=True
        )
        self._watcher.start()

    async def _close(self) -> None:
        self._watch_stop.set()
        if self._watcher is not None:
            await asyncio.to_thread(self._watcher.join)
        self._jobs.put(None)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
        if self._readers is not None:
            await asyncio.to_thread(self._readers.shutdown, wait=True)
        with self._conns_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "tidings_meta" in tables:
                row = conn.execute("SELECT value FROM tidings_meta WHERE key = 'schema_version'").fetchone()
                found = int(row[0]) if row else None
                if found != SCHEMA_VERSION:
                    raise CorruptStore(
                        f"{self.config.path!r} has tidings schema version {found}; this version "
                        f"of tidings reads schema version {SCHEMA_VERSION}"
                    )
            elif tables:
                raise CorruptStore(
                    f"{self.config.path!r} is a SQLite database but not a tidings store "
                    f"(it has tables {', '.join(sorted(tables)[:5])} and no tidings_meta)"
                )
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO tidings_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- the writer thread -------------------------------------------------------------------------

    def _writer_main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            conn = self._connect()
            try:
                self._init_schema(conn)
            except sqlite3.DatabaseError as exc:
                conn.close()
                raise CorruptStore(f"{self.config.path!r} is not a tidings store: {exc}") from exc
            except BaseException:
                conn.close()
                raise
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        try:
            while True:
                first = self._jobs.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < _MAX_BATCH_JOBS:
                    try:
                        job = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        stop = True
                        break
                    batch.append(job)
                self._run_batch(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        # Alone in its transaction, a job needs no savepoint: if it fails, the whole rolls back.
        single = len(batch) == 1
        self._transactions += 1
        self._jobs_done += len(batch)
        for job in batch:
            if job.request is not None:
                self._appends += 1
                self._events += len(job.request.events)
        try:
            conn.execute("BEGIN IMMEDIATE")
            index = 0
            while index < len(batch):
                end = index
                while end < len(batch) and batch[end].request is not None:
                    end += 1
                if end - index > 1:
                    # A run of appends: one state query and one INSERT for all of them.
                    outcomes.extend(self._run_appends(conn, batch[index:end]))
                    index = end
                    continue
                outcomes.append(self._run_job(conn, batch[index], single))
                index += 1
            if conn.in_transaction:
                conn.execute("COMMIT")
        except BaseException as exc:
            # The transaction itself failed (disk full, I/O error, lock timeout): nothing of the
            # batch is committed, and every caller learns it.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            failure = _translate(exc, self.config.path) if isinstance(exc, sqlite3.Error) else exc
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, None, failure)
            return
        # One wake-up per event loop for the whole batch, not one per job: waking the loop costs
        # the writer a system call and a GIL hand-off each time.
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]
        ] = {}
        wrote = False
        for job, (result, error) in zip(batch, outcomes, strict=True):
            wrote = wrote or error is None
            by_loop.setdefault(job.loop, []).append((job.future, result, error))
        for loop, settled in by_loop.items():
            notify = self._notify_appended if wrote and loop is self._loop else None
            with contextlib.suppress(RuntimeError):  # the loop may be closing
                loop.call_soon_threadsafe(_settle_all, settled, notify)

    def _run_job(self, conn: sqlite3.Connection, job: _Job, single: bool) -> tuple[Any, BaseException | None]:
        if not single:
            conn.execute("SAVEPOINT job")
        try:
            result = job.fn(conn)
        except BaseException as exc:
            conn.execute("ROLLBACK" if single else "ROLLBACK TO job")
            if not single:
                conn.execute("RELEASE job")
            return None, _translate(exc, self.config.path) if isinstance(exc, sqlite3.Error) else exc
        if not single:
            conn.execute("RELEASE job")
        return result, None

    def _run_appends(
        self, conn: sqlite3.Connection, jobs: list[_Job]
    ) -> list[tuple[Any, BaseException | None]]:
        """Merge several appends; if the merged write fails unexpectedly, redo them one by one.

        A savepoint guards the merge only when it takes several INSERT statements: one
        statement is atomic by itself, and every SQLite call costs a GIL round trip here.
        """
        requests = [job.request for job in jobs if job.request is not None]
        guarded = sum(len(r.events) for r in requests) > _INSERT_CHUNK
        if guarded:
            conn.execute("SAVEPOINT appends")
        try:
            outcomes = _append_many_in(conn, requests)
        except sqlite3.Error:
            if guarded:
                conn.execute("ROLLBACK TO appends")
                conn.execute("RELEASE appends")
            return [self._run_job(conn, job, single=False) for job in jobs]
        if guarded:
            conn.execute("RELEASE appends")
        return outcomes

    def _watch_other_writers(self) -> None:
        """Thread: notice commits made by other processes (``PRAGMA data_version``), wake waiters.

        Writes through this store wake waiters directly; this only covers other connections, so
        a slow interval is fine. data_version counts commits by *other* connections, per
        connection, so the watch keeps one connection of its own, used by this thread alone.
        """
        try:
            conn = self._connect()
        except TidingsError:
            return  # the store could not open either; its own error is what the caller sees
        try:
            last: int | None = None
            while not self._watch_stop.wait(0.05):
                try:
                    version = int(conn.execute("PRAGMA data_version").fetchone()[0])
                except sqlite3.Error:
                    continue
                if last is not None and version != last and self._loop is not None:
                    with contextlib.suppress(RuntimeError):  # the loop may be closing
                        self._loop.call_soon_threadsafe(self._notify_appended)
                last = version
        finally:
            conn.close()

    # -- primitives -------------------------------------------------------------------------------

    async def _append(self, request: AppendRequest) -> AppendResult:
        return await self.write(lambda conn: _append_in(conn, request), _request=request)

    async def _fetch_stream(
        self, stream_id: str, after: int, before: int | None, backwards: bool, limit: int
    ) -> list[Row]:
        sql = f"SELECT {_ROW_COLUMNS} FROM tidings_events WHERE stream_id = ? AND version > ?"
        params: list[Any] = [stream_id, after]
        if before is not None:
            sql += " AND version < ?"
            params.append(before)
        sql += f" ORDER BY version {'DESC' if backwards else 'ASC'} LIMIT ?"
        params.append(limit)
        return await self._read(lambda c: c.execute(sql, params).fetchall())

    async def _fetch_all(
        self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int
    ) -> tuple[list[Row], int | None]:
        sql = f"SELECT {_ROW_COLUMNS} FROM tidings_events WHERE position > ?"
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

        await self.write(save)

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
        return SQLiteStatistics(
            self._transactions, self._jobs_done, self._appends, self._events, self._jobs.qsize()
        )

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

        await self.write(run)

    async def _commit_processed(self, batch: ProcessedBatch) -> list[AppendResult]:
        return await self.write(lambda conn: _commit_processed_in(conn, batch))

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

    async def _dead_letters(self, group: str | None, id: int | None) -> list[DeadLetter]:
        sql = (
            "SELECT id, group_name, position, event_id, stream_id, event_type, error, traceback, "
            "attempts, failed_at FROM tidings_dead_letters WHERE 1"
        )
        conditions, params = dead_letter_filter(group, id, "?")
        sql += conditions + " ORDER BY id"
        rows = await self._read(lambda c: c.execute(sql, params).fetchall())
        return [_dead_letter_from_row(r) for r in rows]

    async def _discard_dead_letter(self, id: int) -> bool:
        return await self.write(
            lambda c: c.execute("DELETE FROM tidings_dead_letters WHERE id = ?", (id,)).rowcount > 0
        )

    async def _transaction(self, fn: Callable[[Tx], T]) -> T:
        return await self.write(lambda conn: fn(SQLiteTx(conn)))

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


_INSERT_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_CHUNK = 500


@functools.lru_cache(maxsize=64)
def _insert_sql(rows: int) -> str:
    return (
        "INSERT INTO tidings_events (position, stream_id, version, event_id, event_type, "
        "schema_version, timestamp, data, metadata) VALUES " + ", ".join([_INSERT_ROW] * rows)
    )


def _append_many_in(
    conn: sqlite3.Connection, requests: list[AppendRequest]
) -> list[tuple[AppendResult | None, BaseException | None]]:
    """Perform several appends in the open transaction with one state query and one INSERT.

    The expected-version and idempotency rules run in Python against the state read once and
    updated as each request is accepted, so a rejected request simply contributes no rows and
    gets its own error, exactly as if the appends had run one after another.
    """
    streams = list(dict.fromkeys(r.stream_id for r in requests))
    state: dict[str, tuple[int, int]] = {}
    head = 0
    for start in range(0, len(streams), 500):
        chunk = streams[start : start + 500]
        # The head rides along as a row with a NULL stream id: one statement, not two.
        for stream_id, version, position in conn.execute(
            "SELECT NULL, 0, max(position) FROM tidings_events UNION ALL "
            "SELECT stream_id, max(version), max(position) FROM tidings_events "
            f"WHERE stream_id IN ({', '.join('?' * len(chunk))}) GROUP BY stream_id",
            chunk,
        ):
            if stream_id is None:
                head = int(position or 0)
            else:
                state[stream_id] = (int(version), int(position))
    known: dict[bytes, tuple[Any, ...]] = {}
    explicit = [e.event_id.bytes for r in requests if r.explicit_ids for e in r.events]
    for start in range(0, len(explicit), 500):
        ids = explicit[start : start + 500]
        for row in conn.execute(
            "SELECT event_id, stream_id, version, position FROM tidings_events "
            f"WHERE event_id IN ({', '.join('?' * len(ids))})",
            ids,
        ):
            known[bytes(row[0])] = row
    ts = now_micros()
    rows: list[tuple[Any, ...]] = []
    outcomes: list[tuple[AppendResult | None, BaseException | None]] = []
    for request in requests:
        stream_id = request.stream_id
        version, last_position = state.get(stream_id, (0, 0))
        existing = []
        if request.explicit_ids:
            existing = [known[key] for e in request.events if (key := e.event_id.bytes) in known]
        try:
            resolved = request.resolve(version, last_position, existing)
        except TidingsError as exc:
            outcomes.append((None, exc))
            continue
        if resolved is not None:
            outcomes.append((resolved, None))
            continue
        meta = request.metadata
        for i, e in enumerate(request.events, start=1):
            key = e.event_id.bytes
            rows.append(
                (head + i, stream_id, version + i, key, e.event_type, e.schema_version, ts, e.data, meta)
            )
            if request.explicit_ids:
                known[key] = (key, stream_id, version + i, head + i)
        n = len(request.events)
        head += n
        state[stream_id] = (version + n, head)
        outcomes.append((AppendResult(version + n, head), None))
    for start in range(0, len(rows), _INSERT_CHUNK):
        chunk_rows = rows[start : start + _INSERT_CHUNK]
        conn.execute(_insert_sql(len(chunk_rows)), [value for row in chunk_rows for value in row])
    return outcomes


def _append_in(conn: sqlite3.Connection, request: AppendRequest) -> AppendResult:
    """Perform one append inside the writer's open transaction (a merge of one)."""
    [(result, error)] = _append_many_in(conn, [request])
    if error is not None:
        raise error
    assert result is not None
    return result


def _translate(exc: BaseException, path: str) -> TidingsError:
    if isinstance(exc, TidingsError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError) and "event_id" in str(exc):
        return StoreError(f"{path!r}: an event id is already stored: {exc}")
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in str(exc) or "malformed" in str(exc)):
        return CorruptStore(f"{path!r} is corrupt or not a SQLite database: {exc}")
    return StoreError(f"SQLite error on {path!r}: {exc}")


def sqlite_path_exists(url: str) -> bool:
    """Whether the file behind a sqlite URL exists (used by the CLI to avoid creating one)."""
    return os.path.exists(SQLiteConfig.from_url(url).path)


class SQLiteTx:
    """:class:`~tidings.store.records.Tx` over the writer's connection (``?`` placeholders)."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> sqlite3.Cursor:
        return self.conn.executemany(sql, rows)

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = self.conn.execute(sql, params).fetchone()
        return row

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()


def _commit_processed_in(conn: sqlite3.Connection, batch: ProcessedBatch) -> list[AppendResult]:
    row = conn.execute(
        "SELECT position FROM tidings_checkpoints WHERE group_name = ?", (batch.group,)
    ).fetchone()
    actual = 0 if row is None else int(row[0])
    if actual != batch.expected_checkpoint:
        raise CheckpointConflict(batch.group, batch.expected_checkpoint, actual)
    if batch.work is not None:
        batch.work(SQLiteTx(conn))
    results = [_append_in(conn, request) for request in batch.appends]
    if batch.processed:
        conn.executemany(
            "INSERT OR IGNORE INTO tidings_inbox (group_name, event_id, position) VALUES (?, ?, ?)",
            [(batch.group, event_id.bytes, position) for event_id, position in batch.processed],
        )
    now = now_micros()
    if batch.dead_letters:
        conn.executemany(
            # One entry per (group, event): a failed retry updates it and keeps its id.
            "INSERT INTO tidings_dead_letters (group_name, position, event_id, stream_id, "
            "event_type, error, traceback, attempts, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (group_name, event_id) DO UPDATE SET position = excluded.position, "
            "error = excluded.error, traceback = excluded.traceback, "
            "attempts = tidings_dead_letters.attempts + excluded.attempts, failed_at = excluded.failed_at",
            [
                (
                    batch.group,
                    d.position,
                    d.event_id.bytes,
                    d.stream_id,
                    d.event_type,
                    d.error,
                    d.traceback,
                    d.attempts,
                    now,
                )
                for d in batch.dead_letters
            ],
        )
    if batch.remove_dead_letter is not None:
        conn.execute("DELETE FROM tidings_dead_letters WHERE id = ?", (batch.remove_dead_letter,))
    if batch.checkpoint != actual:
        conn.execute(
            "INSERT INTO tidings_checkpoints (group_name, position, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (group_name) DO UPDATE SET position = excluded.position, "
            "updated_at = excluded.updated_at",
            (batch.group, batch.checkpoint, now),
        )
    return results


def _dead_letter_from_row(row: tuple[Any, ...]) -> DeadLetter:
    return DeadLetter(
        id=row[0],
        group=row[1],
        position=row[2],
        event_id=uuid.UUID(bytes=bytes(row[3])),
        stream_id=row[4],
        event_type=row[5],
        error=row[6],
        traceback=row[7],
        attempts=row[8],
        failed_at=datetime_from_micros(row[9]),
    )
