"""The PostgreSQL event store (``postgresql://user@host/db``), for many processes and machines.

Install with ``pip install 'tidings[postgres]'`` (psycopg 3 and psycopg-pool). URL options, next to
libpq's own (``sslmode``, ``application_name``, ...):

* ``schema=NAME`` -- the PostgreSQL schema holding the tables (default ``public``); stores in
  different schemas of one database do not see each other;
* ``migrate=false`` -- do not create or migrate the tables on open (run ``tidings db migrate``);
* ``poll_interval=SECONDS`` -- the backstop for lost notifications (default 0.5);
* ``pool_size=N`` -- most connections this store opens (default 10), plus one for LISTEN;
* ``pool_timeout=SECONDS`` -- how long an operation waits for a connection (default 30), e.g.
  while the server restarts.

The gap problem, and why commit order equals position order here
=================================================================

A reader of the global log remembers the last position it processed and asks for what comes after
it. If positions came from a sequence, a transaction holding position 10 could commit after one
holding 11; a reader that saw 11 would move past 10 and never see it. tidings must never skip.

There are two known cures. One lets writers commit in any order and makes readers stop below a
*safe high-water mark* (rows carry ``pg_current_xact_id()``; readers return only rows older than
``pg_snapshot_xmin(pg_current_snapshot())``). It commits in parallel, but a sequence burns numbers
on every rollback (a rejected append must not consume a position: the contract's positions are
1, 2, 3, ...), one long transaction anywhere in the database -- a report, a migration, ``psql`` left
open -- holds every reader back, and readers pay for the check on every page.

This store uses the other cure: **commit order equals position order**. Positions are taken from a
one-row counter (``tidings_head``) by ``UPDATE ... RETURNING``, which row-locks it until the
transaction ends. The next appender's ``UPDATE`` waits for that commit and then reads the new
value, so positions are assigned and become visible strictly in order, with no gaps: a rolled back
append releases the lock without having changed the counter. Readers need no high-water mark at all
-- a plain ``WHERE position > $after ORDER BY position`` can never see N+1 before N -- and
``head()`` is a one-row read of the counter.

The price is that appends to one schema commit one at a time. Two things make that cheap:

* **Group commit.** Each store has one writer task. Appends made concurrently in the process queue
  up and are written together: one round trip reads the current versions of every stream in the
  batch (and any explicit event ids), the shared rules of :meth:`AppendRequest.resolve` run in
  Python, and a *single* ``INSERT ... SELECT FROM unnest(...)`` statement takes the counter, inserts
  all events of all accepted appends, ``pg_notify``-s the listeners and commits. Eight tasks
  appending ten events each cost two round trips and one commit, not eight of each.
* **The lock is held by the server alone.** Versions are read *before* the counter is locked, and
  the insert statement runs in autocommit mode, so the counter stays locked only for the time the
  server needs to execute that one statement and flush its commit -- never across a network round
  trip, never while a client process is descheduled. If the versions read were stale (another
  process appended to one of the streams in between), the unique indexes on ``(stream_id,
  version)`` and ``event_id`` reject the insert and nothing is written; the batch is then redone in
  one transaction that locks the counter *first*, so its reads cannot be stale.

What this costs: across processes, appends to one schema are bounded by one commit -- one WAL
flush -- at a time (on a 2-core test machine, CPU runs out first). Within a process, group commit
amortises the flush over every append waiting. Turning ``synchronous_commit`` off inside the lock
would release it before the flush, but readers could then see, and act on, events that a crash
takes back and whose positions a later append reuses; tidings does not trade that away. Schemas are
independent (each has its own counter), except that PostgreSQL serialises the commit step of
NOTIFY-ing transactions database-wide.

Appends that share a transaction with other work (a subscription step that emits events with its
checkpoint, :meth:`~EventStore.commit_processed`) lock the counter and hold it until that
transaction commits; the work itself (a projection's writes) runs before the lock is taken.
Synchronous projection code (:class:`~tidings.store.records.Tx`) runs in a worker thread whose
statements are executed on the event loop, on the transaction's connection
(:mod:`tidings.store.postgres_tx`).

Live delivery: every append transaction ``pg_notify``-s a per-schema channel; one dedicated
connection per store LISTENs and wakes :meth:`~EventStore.wait_for_append` waiters. Notifications
are only a wake-up: a task also polls the head every ``poll_interval`` seconds, so a notification
lost to a dropped connection or a restarted server delays delivery by at most that long, and the
listener reconnects on its own.

Connections come from a psycopg pool. A broken connection (server restart, failover) is replaced:
reads are retried once on a fresh connection; an append whose connection broke while it was being
committed is re-sent as an exact retry of itself (by its event ids), so it is stored exactly once
whether or not the first attempt reached the server. When the listener reconnects after losing
its connection, the pool is replaced by a fresh one, so that the store does not sit out the pool's
exponential reconnection backoff after the server is back.

A client that dies while holding the counter (only possible inside a multi-statement transaction)
blocks other appenders until the server notices the dead connection: at once when the process dies
(its socket closes), after TCP keepalive timeouts when its machine or network does. Set
``idle_in_transaction_session_timeout`` (and TCP keepalives) on the server to bound the latter.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeAlias, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tidings.errors import (
    CheckpointConflict,
    ConcurrencyError,
    CorruptStore,
    DuplicateEventId,
    InvalidArgument,
    MissingExtra,
    StoreError,
    TidingsError,
)

try:
    import psycopg
    import psycopg.conninfo
    from psycopg import errors as pg_errors
    from psycopg_pool import AsyncConnectionPool, PoolTimeout
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingExtra("the PostgreSQL store", "postgres", exc) from exc

from tidings.events import EventRegistry
from tidings.store.base import (
    AppendRequest,
    AppendResult,
    EventStore,
    Row,
    Snapshot,
    StreamInfo,
)
from tidings.store.postgres_schema import (
    LATEST_VERSION,
    channel_name,
    inspect_schema,
    lock_key,
    migrate_schema,
    quote_schema,
)
from tidings.store.postgres_tx import PostgresTx, to_psycopg
from tidings.store.records import DeadLetter, ProcessedBatch, Tx, dead_letter_filter

__all__ = ["PostgresConfig", "PostgresStatistics", "PostgresStore", "PostgresTransaction", "migrate"]

_log = logging.getLogger("tidings.store.postgres")

T = TypeVar("T")

Connection: TypeAlias = "psycopg.AsyncConnection[Any]"

_OPTIONS: Final = frozenset({"schema", "migrate", "poll_interval", "pool_size", "pool_timeout"})
_MAX_BATCH_REQUESTS: Final = 512
_MAX_BATCH_EVENTS: Final = 20_000
_INT8_MAX: Final = 2**63 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_ROW_COLUMNS: Final = (
    "position, stream_id, version, event_id, event_type, schema_version, timestamp, data, metadata"
)


@dataclasses.dataclass(frozen=True, slots=True)
class PostgresConfig:
    """Options of the PostgreSQL backend, read from the URL (see the module docstring).

    ``conninfo`` is the URL without tidings' own options, as handed to libpq.
    """

    conninfo: str
    schema: str = "public"
    migrate: bool = True
    poll_interval: float = 0.5
    pool_size: int = 10
    pool_timeout: float = 30.0

    @classmethod
    def from_url(cls, url: str) -> PostgresConfig:
        """Parse ``url``; raise :class:`InvalidArgument` for a malformed URL or option."""
        parts = urlsplit(url)
        if parts.scheme not in ("postgresql", "postgres"):
            raise InvalidArgument(f"not a PostgreSQL URL: {redact(url)!r}")
        ours: dict[str, str] = {}
        libpq: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in _OPTIONS:
                ours[key] = value
            else:
                libpq.append((key, value))
        if not any(key == "application_name" for key, _ in libpq):
            libpq.append(("application_name", "tidings"))
        conninfo = urlunsplit(parts._replace(query=urlencode(libpq)))
        try:
            psycopg.conninfo.conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            raise InvalidArgument(f"{redact(url)!r} is not a valid PostgreSQL URL: {exc}") from exc
        schema = ours.get("schema", "public")
        quote_schema(schema)
        migrate_option = ours.get("migrate", "true").lower()
        if migrate_option not in ("true", "false", "1", "0", "yes", "no"):
            raise InvalidArgument(f"{redact(url)!r}: migrate must be true or false, not {migrate_option!r}")
        return cls(
            conninfo=conninfo,
            schema=schema,
            migrate=migrate_option in ("true", "1", "yes"),
            poll_interval=_positive(url, ours, "poll_interval", 0.5),
            pool_size=int(_positive(url, ours, "pool_size", 10, integer=True)),
            pool_timeout=_positive(url, ours, "pool_timeout", 30.0),
        )


def _positive(
    url: str, options: dict[str, str], name: str, default: float, *, integer: bool = False
) -> float:
    raw = options.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = -1
    if not value > 0:
        kind = "a positive integer" if integer else "a positive number of seconds"
        raise InvalidArgument(f"{redact(url)!r}: {name} must be {kind}, not {raw!r}")
    return value


def redact(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` option) masked, for messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = urlencode(
        [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class _Sql:
    """The statements of one schema, built once (the schema name is a validated identifier)."""

    def __init__(self, schema: str) -> None:
        s = quote_schema(schema)
        self.lock_head = f"SELECT position FROM {s}.tidings_head FOR UPDATE"
        self.head = f"SELECT position FROM {s}.tidings_head"
        # One statement answers both questions an append batch has: each stream's last version
        # and position (kind 0), and where any explicitly given event ids are already stored
        # (kind 1). The lateral LIMIT 1 is a backward scan of the (stream_id, version) index.
        self.lookup = (
            "SELECT 0, s.stream_id, e.version, e.position, NULL::uuid "
            "FROM unnest(%b::text[]) AS s(stream_id) LEFT JOIN LATERAL ("
            f"  SELECT version, position FROM {s}.tidings_events AS t "
            "   WHERE t.stream_id = s.stream_id ORDER BY version DESC LIMIT 1"
            ") AS e ON true "
            "UNION ALL "
            f"SELECT 1, stream_id, version, position, event_id FROM {s}.tidings_events "
            "WHERE event_id = ANY(%b::uuid[])"
        )
        # Takes the next n positions (row-locking the counter until commit), inserts every event of
        # the batch in one go, and announces the new head. The timestamp is read once, after the
        # lock, so timestamps never decrease along the log. Data-modifying CTEs always run to
        # completion, whether or not the outer query reads them.
        self.insert = (
            f"WITH head AS (UPDATE {s}.tidings_head SET position = position + %(n)s "
            "  RETURNING position - %(n)s AS base), "
            "now AS (SELECT clock_timestamp() AS ts FROM head), "
            f"ins AS (INSERT INTO {s}.tidings_events ({_ROW_COLUMNS}) "
            "  SELECT head.base + u.ord, u.stream_id, u.version, u.event_id, u.event_type, "
            "         u.schema_version, now.ts, u.data, u.metadata "
            "  FROM head, now, unnest(%(streams)b::text[], %(versions)b::int8[], %(ids)b::uuid[], "
            "       %(types)b::text[], %(schemas)b::int4[], %(data)b::bytea[], %(meta)b::bytea[]) "
            "       WITH ORDINALITY AS u(stream_id, version, event_id, event_type, schema_version, "
            "                            data, metadata, ord)) "
            "SELECT head.base, pg_notify(%(channel)s, (head.base + %(n)s)::text) FROM head"
        )
        self.stream = f"SELECT {_ROW_COLUMNS} FROM {s}.tidings_events WHERE stream_id = %s AND version > %s"
        self.all = f"SELECT {_ROW_COLUMNS} FROM {s}.tidings_events WHERE position > %s"
        # Skip scan over the (stream_id, version) index: one index probe per stream listed, instead
        # of a GROUP BY over every event. The recursion counts its rows, so it stops at the page
        # size; with the "C" collation, the ids starting with a prefix are contiguous.
        streams = (
            "WITH RECURSIVE ids(stream_id, n) AS ("
            f"  (SELECT stream_id, 1 FROM {s}.tidings_events WHERE stream_id {{op}} %(start)s "
            "    ORDER BY stream_id LIMIT 1) "
            "  UNION ALL "
            f"  SELECT (SELECT t.stream_id FROM {s}.tidings_events AS t "
            "          WHERE t.stream_id > ids.stream_id ORDER BY t.stream_id LIMIT 1), ids.n + 1 "
            "  FROM ids WHERE ids.stream_id IS NOT NULL AND ids.n < %(limit)s "
            "  AND starts_with(ids.stream_id, %(prefix)s)"
            ") "
            "SELECT ids.stream_id, last.version, last.position FROM ids CROSS JOIN LATERAL ("
            f"  SELECT version, position FROM {s}.tidings_events AS t "
            "   WHERE t.stream_id = ids.stream_id ORDER BY version DESC LIMIT 1"
            ") AS last "
            "WHERE ids.stream_id IS NOT NULL AND starts_with(ids.stream_id, %(prefix)s) "
            "ORDER BY ids.stream_id"
        )
        self.streams_after = streams.format(op=">")
        self.streams_from = streams.format(op=">=")
        self.version = (
            f"SELECT version FROM {s}.tidings_events WHERE stream_id = %s ORDER BY version DESC LIMIT 1"
        )
        self.version_at = (
            f"SELECT max(version) FROM {s}.tidings_events WHERE stream_id = %s AND timestamp <= %s"
        )
        self.save_snapshot = (
            f"INSERT INTO {s}.tidings_snapshots (stream_id, version, aggregate_type, schema, state) "
            "VALUES (%s, %s, %s, %s, %b) ON CONFLICT (stream_id, version) DO UPDATE SET "
            "aggregate_type = excluded.aggregate_type, schema = excluded.schema, state = excluded.state"
        )
        self.load_checkpoint = f"SELECT position FROM {s}.tidings_checkpoints WHERE group_name = %s"
        self.checkpoints = f"SELECT group_name, position FROM {s}.tidings_checkpoints"
        self.save_checkpoint = (
            f"INSERT INTO {s}.tidings_checkpoints (group_name, position, updated_at) "
            "VALUES (%s, %s, now()) ON CONFLICT (group_name) DO UPDATE SET "
            "position = excluded.position, updated_at = excluded.updated_at"
        )
        self.delete_checkpoint = f"DELETE FROM {s}.tidings_checkpoints WHERE group_name = %s"
        self.delete_inbox = f"DELETE FROM {s}.tidings_inbox WHERE group_name = %s"
        self.save_inbox = (
            f"INSERT INTO {s}.tidings_inbox (group_name, event_id, position) "
            "SELECT %s, u.event_id, u.position FROM unnest(%s::uuid[], %s::int8[]) AS u(event_id, position) "
            "ON CONFLICT DO NOTHING"
        )
        self.processed_ids = (
            f"SELECT event_id FROM {s}.tidings_inbox WHERE group_name = %s AND event_id = ANY(%s::uuid[])"
        )
        self.save_dead_letter = (
            f"INSERT INTO {s}.tidings_dead_letters (group_name, position, event_id, stream_id, "
            "event_type, error, traceback, attempts, failed_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now()) ON CONFLICT (group_name, event_id) DO UPDATE SET "
            "position = excluded.position, stream_id = excluded.stream_id, "
            "event_type = excluded.event_type, error = excluded.error, traceback = excluded.traceback, "
            "attempts = tidings_dead_letters.attempts + excluded.attempts, failed_at = excluded.failed_at"
        )
        self.dead_letters = (
            "SELECT id, group_name, position, event_id, stream_id, event_type, error, traceback, "
            f"attempts, failed_at FROM {s}.tidings_dead_letters WHERE true"
        )
        self.delete_dead_letter = f"DELETE FROM {s}.tidings_dead_letters WHERE id = %s"
        self.load_snapshot = (
            f"SELECT stream_id, version, aggregate_type, schema, state FROM {s}.tidings_snapshots "
            "WHERE stream_id = %s AND version <= %s ORDER BY version DESC LIMIT 1"
        )


@dataclasses.dataclass(slots=True)
class _Batch:
    """The writes of one group commit, worked out in Python from the versions read.

    ``outcomes[i]`` is request i's result or error. A position that depends on where the batch
    lands in the log is *pending*: stored as ``-k`` for the batch's k-th event (1-based), and
    turned into ``base + k`` once the insert has returned the base. Real positions are >= 0, so the
    two never mix up; :meth:`AppendRequest.resolve` only passes positions through.
    """

    outcomes: list[AppendResult | TidingsError]
    streams: list[str]
    versions: list[int]
    ids: list[uuid.UUID]
    types: list[str]
    schemas: list[int]
    data: list[bytes]
    meta: list[bytes | None]

    def results(self, base: int) -> list[AppendResult | TidingsError]:
        return [
            AppendResult(o.version, base - o.position)
            if isinstance(o, AppendResult) and o.position < 0
            else o
            for o in self.outcomes
        ]


def _plan(requests: Sequence[AppendRequest], found: Sequence[tuple[Any, ...]]) -> _Batch:
    """Apply the shared append rules to ``requests`` in order, given the rows ``lookup`` returned.

    Later requests see the effect of earlier ones of the same batch (same stream, same ids).
    """
    streams: dict[str, tuple[int, int]] = {}
    stored: dict[uuid.UUID, tuple[Any, ...]] = {}
    for kind, stream_id, version, position, event_id in found:
        if kind == 0:
            streams[stream_id] = (0, 0) if version is None else (int(version), int(position))
        else:
            stored[event_id] = (event_id, stream_id, int(version), int(position))
    batch = _Batch([], [], [], [], [], [], [], [])
    for request in requests:
        version, last = streams.get(request.stream_id, (0, 0))
        existing = []
        if request.explicit_ids:
            existing = [row for e in request.events if (row := stored.get(e.event_id)) is not None]
        try:
            resolved = request.resolve(version, last, existing)
        except (ConcurrencyError, DuplicateEventId) as exc:
            batch.outcomes.append(exc)
            continue
        if resolved is not None:
            batch.outcomes.append(resolved)
            continue
        for offset, event in enumerate(request.events, start=1):
            batch.streams.append(request.stream_id)
            batch.versions.append(version + offset)
            batch.ids.append(event.event_id)
            batch.types.append(event.event_type)
            batch.schemas.append(event.schema_version)
            batch.data.append(event.data)
            batch.meta.append(request.metadata)
            stored[event.event_id] = (event.event_id, request.stream_id, version + offset, -len(batch.ids))
        version += len(request.events)
        streams[request.stream_id] = (version, -len(batch.ids))
        batch.outcomes.append(AppendResult(version, -len(batch.ids)))
    return batch


async def _lookup(conn: Connection, sql: _Sql, requests: Sequence[AppendRequest]) -> list[tuple[Any, ...]]:
    stream_ids = list(dict.fromkeys(r.stream_id for r in requests))
    ids = [e.event_id for r in requests if r.explicit_ids for e in r.events]
    cur = await conn.execute(sql.lookup, (stream_ids, ids))
    return await cur.fetchall()


async def _insert(conn: Connection, sql: _Sql, batch: _Batch, channel: str) -> int:
    """Run the insert statement for ``batch``; return the position before its first event."""
    cur = await conn.execute(
        sql.insert,
        {
            "n": len(batch.ids),
            "streams": batch.streams,
            "versions": batch.versions,
            "ids": batch.ids,
            "types": batch.types,
            "schemas": batch.schemas,
            "data": batch.data,
            "meta": batch.meta,
            "channel": channel,
        },
    )
    row = await cur.fetchone()
    if row is None:
        raise CorruptStore("the tidings_head table has lost its row; the store cannot assign positions")
    return int(row[0])


async def _append_locked(
    conn: Connection, sql: _Sql, channel: str, requests: Sequence[AppendRequest]
) -> list[AppendResult | TidingsError]:
    """Append inside the caller's open transaction, locking the position counter first.

    Holding the counter before reading means no other append can commit in between, so the
    versions read are current and the insert cannot conflict. The lock lasts until the caller's
    transaction ends.
    """
    await conn.execute(sql.lock_head)
    batch = _plan(requests, await _lookup(conn, sql, requests))
    if not batch.ids:
        return batch.outcomes
    return batch.results(await _insert(conn, sql, batch, channel))


@dataclasses.dataclass(frozen=True, slots=True)
class PostgresStatistics:
    """Counters of one store's writer since it was opened (see :meth:`PostgresStore.statistics`).

    ``batches``: group commits attempted; ``appends`` / ``events``: append calls and events they
    carried; ``locked_redos``: batches redone under the position lock because another process had
    appended to one of their streams in between; ``connection_retries``: operations retried on a
    fresh connection after one broke; ``queued``: appends waiting for the next group commit now.
    """

    batches: int
    appends: int
    events: int
    locked_redos: int
    connection_retries: int
    queued: int


@dataclasses.dataclass(slots=True)
class _Job:
    request: AppendRequest
    future: asyncio.Future[AppendResult]


class PostgresTransaction:
    """An open transaction on one of the store's connections (see :meth:`PostgresStore._begin`).

    ``connection`` runs the caller's own statements; :meth:`append` appends in the same transaction.
    """

    def __init__(self, store: PostgresStore, connection: Connection) -> None:
        self.store = store
        self.connection = connection
        self.appended = False

    async def append(self, request: AppendRequest) -> AppendResult:
        """Append ``request`` (from :meth:`EventStore.prepare_append`) in this transaction.

        Locks the position counter until the transaction ends: keep the rest of it short, other
        appenders wait. Raises :class:`ConcurrencyError` / :class:`DuplicateEventId` (the
        transaction stays usable) or :class:`StoreError`.
        """
        try:
            [outcome] = await _append_locked(self.connection, self.store._sql, self.store._channel, [request])
        except psycopg.Error as exc:
            raise self.store._translate(exc) from exc
        if isinstance(outcome, TidingsError):
            raise outcome
        self.appended = self.appended or bool(request.events)
        return outcome


class PostgresStore(EventStore):
    """An :class:`~tidings.store.EventStore` in PostgreSQL (see the module docstring for the design).

    Any number of processes may open the same URL; their appends interleave with gap-free,
    strictly increasing positions that readers never skip, and each process learns of the others'
    appends through LISTEN/NOTIFY (with a polling backstop).
    """

    def __init__(self, url: str, *, registry: EventRegistry | None = None) -> None:
        super().__init__(url, registry=registry)
        self.config = PostgresConfig.from_url(url)
        self._where = redact(url)
        self._sql = _Sql(self.config.schema)
        self._channel = channel_name(self.config.schema)
        self._pool: AsyncConnectionPool[Any] | None = None
        self._queue: collections.deque[_Job] = collections.deque()
        self._work = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._retired: set[asyncio.Task[None]] = set()  # old pools closing after _renew_pool
        # The highest head this store has announced to its waiters: the NOTIFY echo of our own
        # appends, and the poller's sightings of them, are then not announced a second time.
        self._announced = 0
        self._stats = dict.fromkeys(("batches", "appends", "events", "locked_redos", "connection_retries"), 0)

    # -- lifecycle ------------------------------------------------------------------------------

    def database_identity(self) -> str:
        return f"postgresql:{self.config.conninfo}#{self.config.schema}"

    async def _open(self) -> None:
        try:
            conn = await psycopg.AsyncConnection.connect(self.config.conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise self._translate(exc, "cannot connect to") from exc
        try:
            await self._prepare_schema(conn)
            await conn.execute(f'LISTEN "{self._channel}"')
        except BaseException:
            await conn.close()
            raise
        pool = self._new_pool()
        try:
            await pool.open(wait=True, timeout=self.config.pool_timeout)
        except psycopg.Error as exc:
            await conn.close()
            await pool.close()
            raise self._translate(exc, "cannot connect to") from exc
        self._pool = pool
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._writer(), name=f"tidings-pg-writer:{self.config.schema}"),
            loop.create_task(self._listen(conn), name=f"tidings-pg-listener:{self.config.schema}"),
            loop.create_task(self._poll(), name=f"tidings-pg-poller:{self.config.schema}"),
        ]

    def _new_pool(self) -> AsyncConnectionPool[Any]:
        return AsyncConnectionPool(
            self.config.conninfo,
            min_size=min(2, self.config.pool_size),
            max_size=self.config.pool_size,
            kwargs={"autocommit": True},
            configure=self._configure,
            timeout=self.config.pool_timeout,
            name=f"tidings:{self.config.schema}",
            open=False,
        )

    async def _renew_pool(self) -> None:
        """Replace the pool with a fresh one (the old one closes in the background).

        Called when the listener has reconnected after losing its connection, i.e. when the
        server is known to be back after an outage. psycopg's pool retries failed connection
        attempts with exponential backoff (1 s, 2 s, 4 s, ...), so after a long outage it could
        take as long again to notice that the server is back; a new pool connects at once.
        Operations waiting on the old pool get ``PoolClosed`` and are retried on the new one.
        """
        old, new = self._pool, self._new_pool()
        await new.open(wait=False)
        self._pool = new
        if old is not None:
            closing = asyncio.get_running_loop().create_task(old.close())
            self._retired.add(closing)
            closing.add_done_callback(self._retired.discard)

    async def _configure(self, conn: Connection) -> None:
        # Timestamps come back in UTC whatever the server's TimeZone is, and unqualified names in
        # projection and query SQL resolve in this store's schema only (never in another's).
        await conn.execute(f"SET TIME ZONE 'UTC'; SET search_path TO {quote_schema(self.config.schema)}")

    async def _prepare_schema(self, conn: Connection) -> None:
        schema = self.config.schema
        try:
            state = await inspect_schema(conn, schema)
            state.check()
            if not state.pending:
                return
            if not self.config.migrate:
                found = f"at version {max(state.applied)}" if state.applied else "without tidings tables"
                raise StoreError(
                    f"PostgreSQL schema {schema!r} of {self._where} is {found}, this tidings needs "
                    f"version {LATEST_VERSION}, and the URL says migrate=false: run "
                    f"`tidings db migrate --store URL` (or open without migrate=false)"
                )
            await migrate_schema(conn, schema)
        except psycopg.Error as exc:
            raise self._translate(exc, "cannot prepare the tidings tables in") from exc

    async def _close(self) -> None:
        self._stopping = True
        self._work.set()
        writer, *others = self._tasks
        await writer  # drains the queue: every accepted append gets its outcome
        for task in others:
            task.cancel()
        for task in others:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pool is not None:
            await self._pool.close()
        if self._retired:
            await asyncio.gather(*self._retired, return_exceptions=True)

    def statistics(self) -> PostgresStatistics:
        """How the writer has been doing: batch sizes, redos, retries, queue length (for tooling)."""
        return PostgresStatistics(**self._stats, queued=len(self._queue))

    @property
    def schema(self) -> str:
        """The PostgreSQL schema holding this store's tables."""
        return self.config.schema

    # -- transactions -----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _begin(self) -> AsyncIterator[PostgresTransaction]:
        """A transaction on a pooled connection, committed when the block ends without error.

        The building block of everything that must commit atomically with appends or with other
        rows of this database (a subscription step, a projection's tables and checkpoint)::

            async with store._begin() as tx:
                await tx.connection.execute("UPDATE ...")
                await tx.append(store.prepare_append("order-1", [OrderShipped()]))

        Rolled back if the block raises. Waiters are woken after the commit. Driver errors are
        raised as :class:`StoreError`; an error during commit leaves the outcome unknown.
        """
        self._check_open()
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn, conn.transaction():
                tx = PostgresTransaction(self, conn)
                yield tx
        except psycopg.Error as exc:
            raise self._translate(exc) from exc
        if tx.appended:
            self._notify_appended()

    # -- appending --------------------------------------------------------------------------------

    async def _append(self, request: AppendRequest) -> AppendResult:
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(request, future))
        self._work.set()
        return await future

    async def _writer(self) -> None:
        """The group-commit loop: write everything queued, one batch (one commit) at a time."""
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._work.clear()
                await self._work.wait()
                continue
            jobs: list[_Job] = []
            events = 0
            while self._queue and len(jobs) < _MAX_BATCH_REQUESTS:
                job = self._queue[0]
                if jobs and events + len(job.request.events) > _MAX_BATCH_EVENTS:
                    break
                self._queue.popleft()
                if job.future.done():  # the caller was cancelled before its append was sent
                    continue
                jobs.append(job)
                events += len(job.request.events)
            if not jobs:
                continue
            self._stats["batches"] += 1
            self._stats["appends"] += len(jobs)
            self._stats["events"] += events
            try:
                outcomes = await self._write([job.request for job in jobs])
            except Exception as exc:  # a bug; report it to the callers rather than hang them
                error = StoreError(f"{self._where}: internal error while appending: {exc!r}")
                error.__cause__ = exc
                outcomes = [error] * len(jobs)
            head = 0
            for job, outcome in zip(jobs, outcomes, strict=True):
                if isinstance(outcome, AppendResult):
                    head = max(head, outcome.position)
                if job.future.done():  # cancelled while being written: the outcome stands
                    continue
                if isinstance(outcome, BaseException):
                    job.future.set_exception(outcome)
                else:
                    job.future.set_result(outcome)
            self._announce(head)

    async def _write(self, requests: list[AppendRequest]) -> Sequence[AppendResult | TidingsError]:
        """Write one batch; never raises (errors become the outcomes of the requests they hit)."""
        try:
            try:
                return await self._write_batch(requests)
            except PoolTimeout:
                raise
            except psycopg.OperationalError as exc:
                # The connection broke (or the server cancelled us). Whether the commit happened
                # is unknown, so re-send every request as an exact retry of itself: resolve()
                # recognises events that did get stored by their ids and returns their result.
                _log.warning("append batch failed (%s); retrying on a fresh connection", exc)
                await self._recover()
                retry = [dataclasses.replace(r, explicit_ids=True) for r in requests]
                return await self._write_batch(retry)
        except psycopg.Error as exc:
            if len(requests) > 1 and not isinstance(exc, psycopg.OperationalError):
                # Something in the batch broke the statement (it should not: requests arrive
                # validated). Write the requests one by one so the error reaches only its own.
                return [(await self._write([r]))[0] for r in requests]
            error = self._translate(exc)
            return [error] * len(requests)
        except TidingsError as exc:
            return [exc] * len(requests)

    async def _write_batch(self, requests: list[AppendRequest]) -> list[AppendResult | TidingsError]:
        assert self._pool is not None
        async with self._pool.connection() as conn:
            batch = _plan(requests, await _lookup(conn, self._sql, requests))
            if not batch.ids:
                return batch.outcomes
            try:
                base = await _insert(conn, self._sql, batch, self._channel)
            except pg_errors.UniqueViolation:
                # Another process appended to one of these streams (or stored one of these ids)
                # after our read. Nothing was written; redo the batch under the counter lock.
                self._stats["locked_redos"] += 1
                async with conn.pipeline(), conn.transaction():
                    return await _append_locked(conn, self._sql, self._channel, requests)
            return batch.results(base)

    # -- live delivery ------------------------------------------------------------------------------

    async def _listen(self, conn: Connection) -> None:
        """Wake waiters on every notification; reconnect (and wake them) when the connection breaks."""
        try:
            while True:
                try:
                    async for notify in conn.notifies():
                        self._announce(int(notify.payload) if notify.payload.isdigit() else None)
                except psycopg.Error as exc:
                    _log.info("LISTEN connection to %s lost (%s); reconnecting", self._where, exc)
                await conn.close()
                conn = await self._relisten()
                await self._renew_pool()
        finally:
            await conn.close()

    async def _relisten(self) -> Connection:
        delay = 0.05
        while True:
            # Whatever was appended while we were deaf is found by the waiters' own re-check.
            self._notify_appended()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.config.poll_interval)
            try:
                conn = await psycopg.AsyncConnection.connect(self.config.conninfo, autocommit=True)
            except psycopg.Error:
                continue
            try:
                await conn.execute(f'LISTEN "{self._channel}"')
            except psycopg.Error:
                await conn.close()
                continue
            self._notify_appended()
            return conn

    async def _poll(self) -> None:
        """The backstop for lost notifications: wake waiters whenever the head has moved."""
        while True:
            await asyncio.sleep(self.config.poll_interval)
            try:
                head = await self._head()
            except StoreError:
                continue
            self._announce(head)

    def _announce(self, head: int | None) -> None:
        """Wake waiters if ``head`` is news (None: it may be, e.g. after a reconnect)."""
        if head is None or head > self._announced:
            self._announced = max(self._announced, head or 0)
            self._notify_appended()

    # -- reading ----------------------------------------------------------------------------------

    async def _on_connection(self, op: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``op`` on a pooled connection; retried once on a fresh one if the connection broke.

        Only for reads and idempotent writes: a retry may repeat work the server already did.
        """
        assert self._pool is not None
        for attempt in (1, 2):
            try:
                async with self._pool.connection() as conn:
                    return await op(conn)
            except PoolTimeout as exc:
                raise self._translate(exc) from exc
            except psycopg.OperationalError as exc:
                if attempt == 2:
                    raise self._translate(exc) from exc
                await self._recover()
            except psycopg.Error as exc:
                raise self._translate(exc) from exc
        raise AssertionError("unreachable")

    async def _fetch(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[tuple[Any, ...]]:
        """Run a read (see :meth:`_on_connection`) and return its rows."""

        async def fetch(conn: Connection) -> list[tuple[Any, ...]]:
            cur = await conn.execute(sql, params, binary=True)
            rows: list[tuple[Any, ...]] = await cur.fetchall()
            return rows

        return await self._on_connection(fetch)

    async def _fetch_stream(
        self, stream_id: str, after: int, before: int | None, backwards: bool, limit: int
    ) -> list[Row]:
        sql = self._sql.stream
        params: list[Any] = [stream_id, min(after, _INT8_MAX)]
        if before is not None:
            sql += " AND version < %s"
            params.append(min(before, _INT8_MAX))
        sql += f" ORDER BY version {'DESC' if backwards else 'ASC'} LIMIT %s"
        params.append(limit)
        return await self._fetch(sql, params)

    async def _fetch_all(
        self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int
    ) -> tuple[list[Row], int | None]:
        if types == ():
            return [], None
        # No high-water mark is needed: positions commit in order (see the module docstring), so
        # every position below the highest one visible is visible too.
        sql = self._sql.all
        params: list[Any] = [min(after, _INT8_MAX)]
        if types is not None:
            sql += " AND event_type = ANY(%s)"
            params.append(list(types))
        if prefix is not None:
            # starts_with compares exactly; LIKE would treat % and _ in the prefix as wildcards.
            sql += " AND starts_with(stream_id, %s)"
            params.append(prefix)
        sql += " ORDER BY position LIMIT %s"
        params.append(limit)
        rows = await self._fetch(sql, params)
        return rows, (rows[-1][0] if len(rows) == limit else None)

    async def _stream_version(self, stream_id: str) -> int:
        rows = await self._fetch(self._sql.version, [stream_id])
        return int(rows[0][0]) if rows else 0

    async def _head(self) -> int:
        rows = await self._fetch(self._sql.head, ())
        if not rows:
            raise CorruptStore(f"{self._where}: the tidings_head table has lost its row")
        return int(rows[0][0])

    async def _list_streams(self, prefix: str | None, after: str | None, limit: int) -> list[StreamInfo]:
        prefix = prefix or ""
        if after is None or after < prefix:
            # Every id starting with the prefix sorts at or after the prefix itself.
            sql, start = self._sql.streams_from, prefix
        else:
            sql, start = self._sql.streams_after, after
        rows = await self._fetch(sql, {"start": start, "prefix": prefix, "limit": limit})
        return [StreamInfo(r[0], int(r[1]), int(r[2])) for r in rows]

    async def _version_at(self, stream_id: str, micros: int) -> int:
        rows = await self._fetch(self._sql.version_at, [stream_id, _EPOCH + timedelta(microseconds=micros)])
        return int(rows[0][0] or 0) if rows else 0

    # -- snapshots --------------------------------------------------------------------------------

    async def _save_snapshot(self, snapshot: Snapshot) -> None:
        await self._fetch_none(
            self._sql.save_snapshot,
            (snapshot.stream_id, snapshot.version, snapshot.aggregate_type, snapshot.schema, snapshot.state),
        )

    async def _load_snapshot(self, stream_id: str, max_version: int | None) -> Snapshot | None:
        limit = _INT8_MAX if max_version is None else min(max_version, _INT8_MAX)
        rows = await self._fetch(self._sql.load_snapshot, (stream_id, limit))
        if not rows:
            return None
        r = rows[0]
        return Snapshot(r[0], int(r[1]), r[2], r[3], bytes(r[4]))

    async def _fetch_none(self, sql: str, params: Sequence[Any]) -> None:
        """Run an idempotent write in its own transaction (see :meth:`_on_connection`)."""

        async def execute(conn: Connection) -> None:
            await conn.execute(sql, params)

        await self._on_connection(execute)

    # -- processing records -------------------------------------------------------------------------

    async def _load_checkpoint(self, group: str) -> int:
        rows = await self._fetch(self._sql.load_checkpoint, (group,))
        return int(rows[0][0]) if rows else 0

    async def _checkpoints(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in await self._fetch(self._sql.checkpoints, ())}

    async def _set_checkpoint(self, group: str, position: int | None) -> None:
        async with self._begin() as tx:
            conn = tx.connection
            if position is None:
                await conn.execute(self._sql.delete_checkpoint, (group,))
                await conn.execute(self._sql.delete_inbox, (group,))
            else:
                await conn.execute(self._sql.save_checkpoint, (group, position))

    async def _commit_processed(self, batch: ProcessedBatch) -> list[AppendResult]:
        async with self._begin() as tx:
            conn = tx.connection
            # One runner per group at a time, across processes: the compare-and-set below must not
            # race with another runner's, and a missing row cannot be locked with FOR UPDATE.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s)", (lock_key(self.config.schema, batch.group),)
            )
            cur = await conn.execute(self._sql.load_checkpoint, (batch.group,))
            row = await cur.fetchone()
            actual = 0 if row is None else int(row[0])
            if actual != batch.expected_checkpoint:
                raise CheckpointConflict(batch.group, batch.expected_checkpoint, actual)
            if batch.work is not None:
                await self._run_sync(conn, batch.work)
            # Appends last among the writes that take locks: the position counter stays locked
            # from here to the commit, and the projection work above does not hold it up.
            results = [await tx.append(request) for request in batch.appends]
            if batch.processed:
                await conn.execute(
                    self._sql.save_inbox,
                    (batch.group, [e for e, _ in batch.processed], [p for _, p in batch.processed]),
                )
            for d in batch.dead_letters:
                await conn.execute(
                    self._sql.save_dead_letter,
                    (
                        batch.group,
                        d.position,
                        d.event_id,
                        d.stream_id,
                        d.event_type,
                        d.error,
                        d.traceback,
                        d.attempts,
                    ),
                )
            if batch.remove_dead_letter is not None:
                await conn.execute(self._sql.delete_dead_letter, (batch.remove_dead_letter,))
            if batch.checkpoint != actual:
                await conn.execute(self._sql.save_checkpoint, (batch.group, batch.checkpoint))
        return results

    async def _processed_ids(self, group: str, event_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        rows = await self._fetch(self._sql.processed_ids, (group, event_ids))
        return {r[0] for r in rows}

    async def _dead_letters(self, group: str | None, id: int | None) -> list[DeadLetter]:
        conditions, params = dead_letter_filter(group, id, "%s")
        rows = await self._fetch(self._sql.dead_letters + conditions + " ORDER BY id", params)
        return [DeadLetter(*row) for row in rows]

    async def _discard_dead_letter(self, id: int) -> bool:
        async with self._begin() as tx:
            cur = await tx.connection.execute(self._sql.delete_dead_letter, (id,))
            return cur.rowcount > 0

    async def _transaction(self, fn: Callable[[Tx], T]) -> T:
        async with self._begin() as tx:
            return await self._run_sync(tx.connection, fn)

    async def _run_sync(self, conn: Connection, fn: Callable[[Tx], T]) -> T:
        """Run synchronous transaction code in a worker thread; its statements run on ``conn``.

        If the caller is cancelled, the thread is told to stop (its next statement raises) and
        waited for before the cancellation goes on: otherwise the transaction would be rolled
        back while the thread still issues statements, which would then run outside it.
        """
        tx = PostgresTx(conn, asyncio.get_running_loop())
        work = asyncio.ensure_future(asyncio.to_thread(fn, tx))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            tx.close()
            await asyncio.wait([work])
            raise

    async def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return await self._fetch(to_psycopg(sql, params), params or ())

    # -- errors -----------------------------------------------------------------------------------

    async def _recover(self) -> None:
        """After a broken connection: have the pool test its idle connections and replace dead ones,
        so that the retry does not pick another connection that died with the same server."""
        assert self._pool is not None
        self._stats["connection_retries"] += 1
        with contextlib.suppress(psycopg.Error):
            await self._pool.check()

    def _translate(self, exc: BaseException, doing: str = "error on") -> TidingsError:
        return translate(exc, self._where, self.config.schema, doing)


def translate(exc: BaseException, where: str, schema: str, doing: str = "error on") -> TidingsError:
    """Turn a driver error into the :class:`TidingsError` family (chain it with ``from exc``)."""
    if isinstance(exc, TidingsError):
        return exc
    if isinstance(exc, PoolTimeout):
        return StoreError(f"{where}: no connection to PostgreSQL became available in time ({exc})")
    # Missing or altered tidings tables mean the store is damaged; the same errors about the
    # caller's own tables (projection SQL, queries) are ordinary store errors.
    if (
        isinstance(exc, pg_errors.UndefinedTable | pg_errors.UndefinedColumn | pg_errors.DatatypeMismatch)
        and "tidings_" in str(exc)
    ) or isinstance(exc, pg_errors.InvalidSchemaName):
        return CorruptStore(
            f"{where}: the tidings tables in PostgreSQL schema {schema!r} are missing or were altered: {exc}"
        )
    if isinstance(exc, psycopg.OperationalError):
        return StoreError(f"{doing} PostgreSQL at {where}: {str(exc).strip() or type(exc).__name__}")
    return StoreError(f"PostgreSQL {doing} {where}: {type(exc).__name__}: {str(exc).strip()}")


async def migrate(url: str) -> list[int]:
    """Create or migrate the tidings tables for the store at ``url``; return the versions applied.

    Safe to run concurrently and repeatedly (a second run returns ``[]``). Backs the CLI command
    ``tidings db migrate --store URL``. Raises :class:`InvalidArgument` for a bad URL,
    :class:`CorruptStore` for a schema it must not touch, :class:`StoreError` otherwise.
    """
    config = PostgresConfig.from_url(url)
    where = redact(url)
    try:
        async with await psycopg.AsyncConnection.connect(config.conninfo, autocommit=True) as conn:
            return await migrate_schema(conn, config.schema)
    except psycopg.Error as exc:
        raise translate(exc, where, config.schema, "cannot migrate") from exc
