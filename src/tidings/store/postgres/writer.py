"""The PostgreSQL store's append path: planning a group commit, its one INSERT, and the writer task.

See :mod:`tidings.store.postgres` for why positions are taken from a locked counter and why the
versions are read before it is locked.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from tidings.errors import CorruptStore, StoreError, TidingsError
from tidings.store.append import AppendPlan, AppendRequest, AppendResult, StoredId, plan_appends
from tidings.store.postgres.schema import Statements

if TYPE_CHECKING:
    from tidings.store.postgres.store import PostgresStore

__all__ = ["PostgresStatistics", "PostgresWriter", "append_locked"]

_log = logging.getLogger("tidings.store.postgres")

Connection: TypeAlias = "psycopg.AsyncConnection[Any]"

_MAX_BATCH_REQUESTS: Final = 512
_MAX_BATCH_EVENTS: Final = 20_000


def _plan(requests: Sequence[AppendRequest], found: Sequence[tuple[Any, ...]]) -> AppendPlan:
    """The shared append rules (:func:`plan_appends`) applied to the rows ``lookup`` returned."""
    streams: dict[str, tuple[int, int]] = {}
    stored: dict[uuid.UUID, StoredId] = {}
    for kind, stream_id, version, position, event_id in found:
        if kind == 0:
            if version is not None:
                streams[stream_id] = (int(version), int(position))
        else:
            stored[event_id] = StoredId(stream_id, int(version), int(position))
    return plan_appends(requests, streams, stored)


async def _lookup(
    conn: Connection, sql: Statements, requests: Sequence[AppendRequest]
) -> list[tuple[Any, ...]]:
    stream_ids = list(dict.fromkeys(r.stream_id for r in requests))
    ids = [e.event_id for r in requests if r.explicit_ids for e in r.events]
    cur = await conn.execute(sql.lookup, (stream_ids, ids))
    return await cur.fetchall()


async def _insert(conn: Connection, sql: Statements, plan: AppendPlan, channel: str) -> int:
    """Run the insert statement for ``plan``; return the position before its first event."""
    events = plan.events
    cur = await conn.execute(
        sql.insert,
        {
            "n": len(events),
            "streams": [p.stream_id for p in events],
            "versions": [p.version for p in events],
            "ids": [p.event.event_id for p in events],
            "types": [p.event.event_type for p in events],
            "schemas": [p.event.schema_version for p in events],
            "data": [p.event.data for p in events],
            "meta": [p.metadata for p in events],
            "channel": channel,
        },
    )
    row = await cur.fetchone()
    if row is None:
        raise CorruptStore("the tidings_head table has lost its row; the store cannot assign positions")
    return int(row[0])


async def append_locked(
    conn: Connection, sql: Statements, channel: str, requests: Sequence[AppendRequest]
) -> list[AppendResult | TidingsError]:
    """Append inside the caller's open transaction, locking the position counter first.

    Holding the counter before reading means no other append can commit in between, so the
    versions read are current and the insert cannot conflict. The lock lasts until the caller's
    transaction ends.
    """
    await conn.execute(sql.lock_head)
    plan = _plan(requests, await _lookup(conn, sql, requests))
    if not plan.events:
        return plan.outcomes
    return plan.outcomes_at(await _insert(conn, sql, plan, channel))


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


class PostgresWriter:
    """The group-commit writer of one store: a task that writes every queued append, batch by batch.

    ``stats`` counts batches, appends, events, locked redos and connection retries (the store's
    :meth:`~PostgresStore.statistics`).
    """

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.queue: collections.deque[_Job] = collections.deque()
        self.work = asyncio.Event()
        self.stopping = False
        self.stats = dict.fromkeys(("batches", "appends", "events", "locked_redos", "connection_retries"), 0)

    async def submit(self, request: AppendRequest) -> AppendResult:
        """Queue ``request`` for the next group commit and return its outcome."""
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self.queue.append(_Job(request, future))
        self.work.set()
        return await future

    def stop(self) -> None:
        """Make :meth:`run` return once the queue is drained."""
        self.stopping = True
        self.work.set()

    async def run(self) -> None:
        """The group-commit loop: write everything queued, one batch (one commit) at a time."""
        while True:
            if not self.queue:
                if self.stopping:
                    return
                self.work.clear()
                await self.work.wait()
                continue
            jobs: list[_Job] = []
            events = 0
            while self.queue and len(jobs) < _MAX_BATCH_REQUESTS:
                job = self.queue[0]
                if jobs and events + len(job.request.events) > _MAX_BATCH_EVENTS:
                    break
                self.queue.popleft()
                if job.future.done():  # the caller was cancelled before its append was sent
                    continue
                jobs.append(job)
                events += len(job.request.events)
            if not jobs:
                continue
            self.stats["batches"] += 1
            self.stats["appends"] += len(jobs)
            self.stats["events"] += events
            try:
                outcomes = await self._write([job.request for job in jobs])
            except Exception as exc:  # a bug; report it to the callers rather than hang them
                error = StoreError(f"{self.store._where}: internal error while appending: {exc!r}")
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
            self.store._announce(head)

    async def _write(self, requests: list[AppendRequest]) -> Sequence[AppendResult | TidingsError]:
        """Write one batch; never raises (errors become the outcomes of the requests they hit)."""
        try:
            try:
                return await self._write_batch(requests)
            except PoolTimeout:
                raise
            except psycopg.OperationalError as exc:
                # The connection broke (or the server cancelled us). Whether the commit happened
                # is unknown, so re-send every request as an exact retry of itself: the planner
                # recognises events that did get stored by their ids and returns their result.
                _log.warning("append batch failed (%s); retrying on a fresh connection", exc)
                await self.store._recover()
                retry = [dataclasses.replace(r, explicit_ids=True) for r in requests]
                return await self._write_batch(retry)
        except psycopg.Error as exc:
            if len(requests) > 1 and not isinstance(exc, psycopg.OperationalError):
                # Something in the batch broke the statement (it should not: requests arrive
                # validated). Write the requests one by one so the error reaches only its own.
                return [(await self._write([r]))[0] for r in requests]
            error = self.store._translate(exc)
            return [error] * len(requests)
        except TidingsError as exc:
            return [exc] * len(requests)
        except Exception as exc:
            # A value the driver could not even send (it should not happen either): the same.
            if len(requests) > 1:
                return [(await self._write([r]))[0] for r in requests]
            return [self.store._translate(exc)]

    async def _write_batch(self, requests: list[AppendRequest]) -> list[AppendResult | TidingsError]:
        store = self.store
        assert store._pool is not None
        async with store._pool.connection() as conn:
            plan = _plan(requests, await _lookup(conn, store._sql, requests))
            if not plan.events:
                return plan.outcomes
            try:
                base = await _insert(conn, store._sql, plan, store._channel)
            except pg_errors.UniqueViolation:
                # Another process appended to one of these streams (or stored one of these ids)
                # after our read. Nothing was written; redo the batch under the counter lock.
                self.stats["locked_redos"] += 1
                async with conn.pipeline(), conn.transaction():
                    return await append_locked(conn, store._sql, store._channel, requests)
            return plan.outcomes_at(base)
