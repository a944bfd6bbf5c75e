"""The SQLite store's writer thread: every write, in group commits.

One thread owns the only writing connection. Every write (append, snapshot, checkpoint, a
projection's batch) is a *job* queued to it. The writer takes every job that is waiting, runs each
inside its own SAVEPOINT of one shared transaction, and commits once: this is **group commit**. A
job that fails is rolled back to its savepoint alone, so per-call atomicity and per-call errors
survive the batching, while sixteen concurrent appenders pay for one fsync. A run of appends is
merged further: one state query and one INSERT for all of them.

Global positions are assigned here inside the write transaction (``BEGIN IMMEDIATE`` serialises
writers across processes too), so positions commit in order and the log has no gaps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import queue
import sqlite3
import threading
import uuid
from collections.abc import Callable
from typing import Any, Final, TypeVar

from tidings.errors import CorruptStore, InvalidArgument, StatementError, TidingsError
from tidings.events import uuid_from_bytes
from tidings.store.append import AppendRequest, AppendResult, StoredId, plan_appends
from tidings.store.base import Row, now_micros
from tidings.store.sqlite.config import SQLiteConfig, connect, is_read_only_error, read_only_message
from tidings.store.sqlite.errors import BINDING_ERRORS, translate
from tidings.store.sqlite.schema import check_schema, init_schema

__all__ = ["SQLiteStatistics", "SQLiteWriter", "WriteJob", "append_in"]

T = TypeVar("T")

WriteJob = Callable[[sqlite3.Connection], T]
"""A unit of work for the writer thread; it runs inside its own savepoint of a group commit."""

Notify = Callable[[int | None, list[Row], bool, bool], None]
"""Called on the store's loop after a commit: the head its appends reached, their rows, whether a
job that may have changed stored events (one not marked ``keeps_log``) committed, and whether the
head may have moved (wake the waiters)."""

_MAX_BATCH_JOBS: Final = 512
_INSERT_ROW: Final = "(?, ?, ?, ?, ?, ?, ?, ?, ?)"
_INSERT_CHUNK: Final = 500


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
    __slots__ = ("fn", "future", "keeps_log", "loop", "request")

    def __init__(
        self,
        fn: WriteJob[Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        request: AppendRequest | None = None,
        keeps_log: bool = False,
    ) -> None:
        self.fn = fn
        self.future = future
        self.loop = loop
        self.request = request  # set for appends, which the writer can merge
        self.keeps_log = keeps_log  # the job changes no stored event (see Notify)


def _settle_all(
    settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
    notify: Notify | None,
    head: int | None,
    rows: list[Row],
    forget: bool,
    wake: bool,
) -> None:
    for future, result, error in settled:
        _settle(future, result, error)
    if notify is not None:
        notify(head, rows, forget, wake)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the job's outcome stands regardless
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class SQLiteWriter:
    """The writer thread of one store and its queue of jobs.

    ``notify`` is called on ``loop`` (the store's) after a group commit that wrote something, to
    wake the store's waiters, with the highest position an append of the commit wrote (None if
    it appended nothing), the rows its appends inserted, in position order (a failed or
    redone merge contributes none; rows written by other jobs are never among them), and
    whether a job that may have changed stored events committed.
    """

    def __init__(self, config: SQLiteConfig, name: str) -> None:
        self.config = config
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notify: Notify | None = None
        self._rows: list[Row] = []  # the rows the appends of the running batch inserted
        self._transactions = 0
        self._jobs_done = 0
        self._appends = 0
        self._events = 0
        self._head: int | None = None  # the head as last read by _head_moved (None: unknown)

    async def start(self, notify: Notify) -> None:
        """Start the thread; return once its connection is open and the schema is ready.

        Raises :class:`CorruptStore` (and stops the thread) if the file is not a tidings store.
        """
        self._loop = asyncio.get_running_loop()
        self._notify = notify
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._main, args=(ready,), name=self.name, daemon=True)
        self._thread.start()
        await asyncio.wrap_future(ready)

    async def stop(self) -> None:
        """Finish every queued job, then end the thread."""
        self._jobs.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    async def submit(
        self, fn: WriteJob[T], request: AppendRequest | None = None, *, keeps_log: bool = False
    ) -> T:
        """Queue ``fn`` and return its result once the transaction holding it has committed.

        If ``fn`` raises, its savepoint is rolled back (other jobs of the batch commit) and the
        error is re-raised here. ``request`` marks an append that may be merged with others;
        ``keeps_log`` promises that ``fn`` changes no stored event.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(fn, future, loop, request, keeps_log))
        return await future

    def statistics(self) -> SQLiteStatistics:
        """The writer's counters (read without locking: a snapshot, possibly a little stale)."""
        return SQLiteStatistics(
            self._transactions, self._jobs_done, self._appends, self._events, self._jobs.qsize()
        )

    # -- the thread ---------------------------------------------------------------------------------

    def _main(self, ready: concurrent.futures.Future[None]) -> None:
        try:
            # Not in WAL mode yet: the switch is a lasting change to the file, made only once the
            # file is known to be empty or a tidings store. A refused file is left as it was.
            conn = connect(self.config, wal=False)
            try:
                path = self.config.path
                if self.config.read_only:
                    if not check_schema(conn, path):
                        raise CorruptStore(f"{path!r} is not a tidings store (opened read-only)")
                else:
                    check_schema(conn, path)
                    conn.execute("PRAGMA journal_mode = WAL")
                    init_schema(conn, path)
            except sqlite3.DatabaseError as exc:
                conn.close()
                if is_read_only_error(exc):
                    raise StatementError(read_only_message(self.config)) from exc
                if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_CANTOPEN:
                    raise StatementError(f"cannot open {path!r}: {exc} (check permissions)") from exc
                raise CorruptStore(f"{path!r} is not a tidings store: {exc}") from exc
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
        self._rows = []
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
                if end > index:
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
            failure = self._translate(exc)
            for job in batch:
                job.loop.call_soon_threadsafe(_settle, job.future, None, failure)
            return
        # One wake-up per event loop for the whole batch, not one per job: waking the loop costs
        # the writer a system call and a GIL hand-off each time.
        by_loop: dict[
            asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]
        ] = {}
        appended = other = False
        forget = False  # a job that may have changed stored events committed
        head: int | None = None  # the highest position an append of this batch committed
        for job, (result, error) in zip(batch, outcomes, strict=True):
            if error is None:
                forget = forget or not job.keeps_log
                if job.request is not None:
                    appended = True
                    if head is None or result.position > head:
                        head = result.position
                else:
                    other = True
            by_loop.setdefault(job.loop, []).append((job.future, result, error))
        # Waiters are woken only when the head may have moved: an idle service's lease
        # heartbeats and checkpoint commits would otherwise wake every subscription to re-read
        # the head, several times a second each. A job that may have changed stored events is
        # still reported: the store must forget the recent rows it keeps for live readers.
        moved = appended or (other and self._head_moved(conn))
        for loop, settled in by_loop.items():
            notify = self._notify if (moved or forget or self._rows) and loop is self._loop else None
            with contextlib.suppress(RuntimeError):  # the loop may be closing
                loop.call_soon_threadsafe(_settle_all, settled, notify, head, self._rows, forget, moved)

    def _head_moved(self, conn: sqlite3.Connection) -> bool:
        """After a commit of writes other than appends (which may have appended, as a handler's
        batch does): whether the head differs from the one last seen here."""
        try:
            row = conn.execute("SELECT max(position) FROM tidings_events").fetchone()
        except sqlite3.Error:
            return True
        head = None if row[0] is None else int(row[0])
        moved = head != self._head
        self._head = head
        return moved

    def _run_job(self, conn: sqlite3.Connection, job: _Job, single: bool) -> tuple[Any, BaseException | None]:
        if not single:
            conn.execute("SAVEPOINT job")
        try:
            result = job.fn(conn)
        except BaseException as exc:
            conn.execute("ROLLBACK" if single else "ROLLBACK TO job")
            if not single:
                conn.execute("RELEASE job")
            if job.request is not None and isinstance(exc, OverflowError | UnicodeEncodeError):
                # An append whose values SQLite cannot bind: the caller's mistake, not the store's.
                failure = InvalidArgument(
                    f"stream {job.request.stream_id!r:.80}: a value cannot be stored in SQLite: {exc}"
                )
                failure.__cause__ = exc
                return None, failure
            return None, self._translate(exc)
        if not single:
            conn.execute("RELEASE job")
        return result, None

    def _translate(self, exc: BaseException) -> BaseException:
        """sqlite3's errors (and its binding errors) as tidings' own; anything else unchanged,
        such as the exception of a caller's job."""
        if isinstance(exc, (sqlite3.Error, *BINDING_ERRORS)):
            translated = translate(exc, self.config.path)
            translated.__cause__ = exc  # chained as by ``raise ... from exc``: it is raised elsewhere
            return translated
        return exc

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
        rows: list[Row] = []
        try:
            outcomes = append_many_in(conn, requests, rows)
        except Exception:
            # Any failure of the merged write (a driver error, a value SQLite cannot bind) is
            # retried call by call, so that one bad call fails only itself.
            if guarded:
                conn.execute("ROLLBACK TO appends")
                conn.execute("RELEASE appends")
            return [self._run_job(conn, job, single=False) for job in jobs]
        if guarded:
            conn.execute("RELEASE appends")
        self._rows.extend(rows)
        return outcomes


@functools.lru_cache(maxsize=64)
def _insert_sql(rows: int) -> str:
    return (
        "INSERT INTO tidings_events (position, stream_id, version, event_id, event_type, "
        "schema_version, timestamp, data, metadata) VALUES " + ", ".join([_INSERT_ROW] * rows)
    )


def append_many_in(
    conn: sqlite3.Connection, requests: list[AppendRequest], inserted: list[Row] | None = None
) -> list[tuple[AppendResult | None, BaseException | None]]:
    """Perform several appends in the open transaction with one state query and one INSERT.

    :func:`~tidings.store.append.plan_appends` decides each request's fate against the state read
    once, so a rejected request simply contributes no rows and gets its own error, exactly as if
    the appends had run one after another. A failure of the statements themselves is raised (the
    caller redoes the requests one by one to pin it on its own request). The rows written are
    added to ``inserted`` when it is given.
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
    stored: dict[uuid.UUID, StoredId] = {}
    explicit = [e.event_id.bytes for r in requests if r.explicit_ids for e in r.events]
    for start in range(0, len(explicit), 500):
        ids = explicit[start : start + 500]
        for event_id, stream_id, version, position in conn.execute(
            "SELECT event_id, stream_id, version, position FROM tidings_events "
            f"WHERE event_id IN ({', '.join('?' * len(ids))})",
            ids,
        ):
            stored[uuid_from_bytes(event_id)] = StoredId(stream_id, int(version), int(position))
    plan = plan_appends(requests, state, stored)
    if plan.events:
        ts = now_micros()
        rows = [
            (
                head + offset,
                stream_id,
                version,
                e.event_id.bytes,
                e.event_type,
                e.schema_version,
                ts,
                e.data,
                meta,
            )
            for offset, stream_id, version, e, meta in plan.events
        ]
        for start in range(0, len(rows), _INSERT_CHUNK):
            chunk_rows = rows[start : start + _INSERT_CHUNK]
            conn.execute(_insert_sql(len(chunk_rows)), [value for row in chunk_rows for value in row])
        if inserted is not None:
            inserted.extend(rows)
    return [
        (None, outcome) if isinstance(outcome, TidingsError) else (outcome, None)
        for outcome in plan.outcomes_at(head)
    ]


def append_in(conn: sqlite3.Connection, request: AppendRequest) -> AppendResult:
    """Perform one append inside the writer's open transaction (a merge of one)."""
    [(result, error)] = append_many_in(conn, [request])
    if error is not None:
        raise error
    assert result is not None
    return result
