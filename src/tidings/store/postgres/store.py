"""The PostgreSQL event store (see :mod:`tidings.store.postgres` for the design)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeAlias, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from tidings.errors import (
    AlreadyProcessed,
    CheckpointConflict,
    CorruptStore,
    StoreError,
    StoreUnavailable,
    TidingsError,
)
from tidings.events import EventRegistry
from tidings.store.append import AppendRequest, AppendResult
from tidings.store.base import Row, Snapshot, StreamInfo
from tidings.store.deadletters import DeadLetterNotFound
from tidings.store.postgres.config import PostgresConfig, redact
from tidings.store.postgres.errors import translate
from tidings.store.postgres.schema import (
    LATEST_VERSION,
    Statements,
    channel_name,
    inspect_schema,
    lock_key,
    migrate_schema,
    quote_schema,
)
from tidings.store.postgres.tx import PostgresTransaction, PostgresTx, to_psycopg
from tidings.store.postgres.writer import PostgresStatistics, PostgresWriter
from tidings.store.tracking import (
    DeadLetter,
    DeadLetterQuery,
    ProcessedBatch,
    SQLStore,
    Tx,
    dead_letter_filter,
)

__all__ = ["PostgresStore", "migrate"]

_log = logging.getLogger("tidings.store.postgres")

T = TypeVar("T")

Connection: TypeAlias = "psycopg.AsyncConnection[Any]"

_INT8_MAX: Final = 2**63 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


class PostgresStore(SQLStore):
    """A :class:`~tidings.store.SQLStore` in PostgreSQL (see the module docstring for the design).

    Any number of processes may open the same URL; their appends interleave with gap-free,
    strictly increasing positions that readers never skip, and each process learns of the others'
    appends through LISTEN/NOTIFY (with a polling backstop).
    """

    def __init__(self, url: str, *, registry: EventRegistry | None = None) -> None:
        super().__init__(url, registry=registry)
        self.config = PostgresConfig.from_url(url)
        self._where = redact(url)
        self._sql = Statements(self.config.schema)
        self._channel = channel_name(self.config.schema)
        self._pool: AsyncConnectionPool[Any] | None = None
        self._writer = PostgresWriter(self)
        self._tasks: list[asyncio.Task[None]] = []
        self._retired: set[asyncio.Task[None]] = set()  # old pools closing after _renew_pool
        # The highest head this store has announced to its waiters: the NOTIFY echo of our own
        # appends, and the poller's sightings of them, are then not announced a second time.
        self._announced = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def database_identity(self) -> str:
        return f"postgresql:{self.config.conninfo}#{self.config.schema}"

    async def _open(self) -> None:
        try:
            conn = await connect(self.config)
        except psycopg.Error as exc:
            raise connect_error(exc, self._where, self.config.schema) from exc
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
            raise connect_error(exc, self._where, self.config.schema) from exc
        self._pool = pool
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._writer.run(), name=f"tidings-pg-writer:{self.config.schema}"),
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
        # projection and query SQL resolve in this store's schema only (never in another's); JIT
        # is off as on every connection of the store (see connect()).
        await conn.execute(
            f"SET TIME ZONE 'UTC'; SET search_path TO {quote_schema(self.config.schema)}; {_SESSION_SETTINGS}"
        )

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
        self._writer.stop()
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
        return PostgresStatistics(**self._writer.stats, queued=len(self._writer.queue))

    @property
    def safe_url(self) -> str:
        """The URL with its password masked, also one given as a ``password=`` (or
        ``sslpassword=``) query option (see :func:`~tidings.store.postgres.redact`)."""
        return self._where

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
        return await self._writer.submit(request)

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
                conn = await connect(self.config)
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
        failures = 0
        while True:
            pool = self._pool
            assert pool is not None
            try:
                async with pool.connection() as conn:
                    return await op(conn)
            except PoolTimeout as exc:
                raise self._translate(exc) from exc
            except psycopg.OperationalError as exc:
                if isinstance(exc, PoolClosed) and self._pool is not pool:
                    continue  # the pool was replaced meanwhile (see _renew_pool): use the new one
                failures += 1
                if failures == 2:
                    raise self._translate(exc) from exc
                await self._recover()
            except psycopg.Error as exc:
                raise self._translate(exc) from exc

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

    async def _fetch_correlated(
        self, ids: tuple[str, ...], event_ids: tuple[uuid.UUID, ...], after: int, limit: int
    ) -> list[Row]:
        return await self._fetch(
            self._sql.correlated,
            [list(ids), min(after, _INT8_MAX), list(event_ids), min(after, _INT8_MAX), limit],
        )

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
            # The lock commit_processed holds from its compare-and-set read to its commit: without
            # it, a runner's step that read the old checkpoint would commit after this reset and
            # overwrite it. With it, that step either commits first (and this reset wins after
            # it) or reads the reset checkpoint and fails with CheckpointConflict.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key(self.config.schema, group),))
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
            if batch.remove_dead_letter is not None:
                # First, so that a second retry of the same dead letter fails before its work
                # runs; raising rolls the whole step back, so it is applied exactly once.
                cur = await conn.execute(self._sql.delete_dead_letter, (batch.remove_dead_letter,))
                if cur.rowcount == 0:
                    raise DeadLetterNotFound(batch.group, batch.remove_dead_letter)
            if batch.work is not None:
                await self._run_sync(conn, batch.work)
            # Appends last among the writes that take locks: the position counter stays locked
            # from here to the commit, and the projection work above does not hold it up.
            results = [await tx.append(request) for request in batch.appends]
            if batch.processed:
                # Under the group's lock: no other commit of this group can insert them meanwhile.
                cur = await conn.execute(
                    self._sql.processed_ids, (batch.group, [e for e, _ in batch.processed])
                )
                done = [row[0] for row in await cur.fetchall()]
                if done:
                    raise AlreadyProcessed(batch.group, done)
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
            if batch.checkpoint != actual:
                await conn.execute(self._sql.save_checkpoint, (batch.group, batch.checkpoint))
        return results

    async def _processed_ids(self, group: str, event_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        rows = await self._fetch(self._sql.processed_ids, (group, event_ids))
        return {r[0] for r in rows}

    async def _dead_letters(
        self, group: str | None, id: int | None, query: DeadLetterQuery | None = None
    ) -> list[DeadLetter]:
        conditions, params = dead_letter_filter(group, id, "%s", query)
        limit = "" if query is None or query.limit is None else f" LIMIT {int(query.limit)}"
        rows = await self._fetch(self._sql.dead_letters + conditions + " ORDER BY id" + limit, params)
        return [DeadLetter(*row) for row in rows]

    async def _count_dead_letters(self, group: str | None) -> int:
        conditions, params = dead_letter_filter(group, None, "%s")
        sql = self._sql.dead_letters.split(" FROM ", 1)[1]
        rows = await self._fetch("SELECT count(*) FROM " + sql + conditions, params)
        return int(rows[0][0])

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
        tx = PostgresTx(conn, asyncio.get_running_loop(), self._translate)
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
        self._writer.stats["connection_retries"] += 1
        with contextlib.suppress(psycopg.Error):
            await self._pool.check()

    def _translate(self, exc: BaseException, doing: str = "error on") -> TidingsError:
        return translate(exc, self._where, self.config.schema, doing)


async def migrate(url: str) -> list[int]:
    """Create or migrate the tidings tables for the store at ``url``; return the versions applied.

    Safe to run concurrently and repeatedly (a second run returns ``[]``). Backs the CLI command
    ``tidings db migrate --store URL``. Raises :class:`InvalidArgument` for a bad URL,
    :class:`CorruptStore` for a schema it must not touch, :class:`StoreError` otherwise.
    """
    config = PostgresConfig.from_url(url)
    where = redact(url)
    try:
        conn = await connect(config)
    except psycopg.Error as exc:
        raise connect_error(exc, where, config.schema) from exc
    try:
        async with conn:
            return await migrate_schema(conn, config.schema)
    except psycopg.Error as exc:
        raise translate(exc, where, config.schema, "cannot migrate") from exc


_SESSION_SETTINGS: Final = "SET jit = off"
"""Run on every connection the store opens. JIT compilation costs tens of milliseconds per
statement and pays off only for long analytical queries; the store's statements are short, but the
cost estimates of the group-commit INSERT (over ``unnest`` of arrays) exceed the default
``jit_above_cost``, so a JIT-capable server (Debian's, most managed ones) compiled it on every
append: ~95 ms per append instead of ~1 ms. Off for the session, also for projection and query
SQL run through the store (a read model needing JIT can ``SET LOCAL jit = on`` in its transaction)."""

# Connection failures in which the server never answered, or said "not now": waiting can cure them.
_TRANSIENT_STATES: Final = frozenset({"57P03", "53300", "08000", "08001", "08006"})


async def connect(config: PostgresConfig) -> Connection:
    """An autocommit connection for the store's own use (LISTEN, migrations), set up like the
    pooled ones: JIT off (see ``_SESSION_SETTINGS``)."""
    conn = await psycopg.AsyncConnection.connect(config.conninfo, autocommit=True)
    try:
        await conn.execute(_SESSION_SETTINGS)
    except BaseException:
        await conn.close()
        raise
    return conn


def connect_error(exc: psycopg.Error, where: str, schema: str) -> TidingsError:
    """The error for a failed connection attempt: :class:`StoreUnavailable` (transient) when the
    server did not answer in time, refused, or said it cannot accept connections now; otherwise
    (a missing database, a rejected password) the translated error."""
    state = exc.sqlstate
    if isinstance(exc, psycopg.OperationalError) and (state is None or state in _TRANSIENT_STATES):
        detail = str(exc).strip() or type(exc).__name__
        return StoreUnavailable(
            f"cannot connect to PostgreSQL at {where}: {detail} (connect_timeout in the URL sets how "
            "long a connection attempt may take)"
        )
    return translate(exc, where, schema, "cannot connect to")
