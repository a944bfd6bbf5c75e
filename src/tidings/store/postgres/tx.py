"""The PostgreSQL store's transactions: :class:`PostgresTransaction` (async, can append) and the
synchronous :class:`PostgresTx` handed to projection and handler code.

Projection code is synchronous (:class:`~tidings.store.tracking.Tx`): it runs inside a store
transaction and calls ``tx.execute(...)`` without awaiting. On PostgreSQL the transaction lives on
an async psycopg connection owned by the event loop, so the synchronous code runs in a worker
thread and each of its calls is handed to the loop (``run_coroutine_threadsafe``) and waited for.
The loop stays free meanwhile; there is one async code path to the database, not two.

``Tx`` speaks ``?`` placeholders (and ``:name`` with a mapping) on every backend; they are turned
into psycopg's ``%s`` / ``%(name)s`` here, outside string literals, quoted identifiers and comments.
PostgreSQL's JSON operators ``?``, ``?|`` and ``?&`` therefore cannot be written in ``Tx`` SQL with
parameters; use ``jsonb_exists()`` and friends instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg

from tidings.errors import StoreError, TidingsError
from tidings.store.append import AppendRequest, AppendResult
from tidings.store.postgres.writer import append_locked

if TYPE_CHECKING:
    from tidings.store.postgres.store import PostgresStore

__all__ = ["PostgresTransaction", "PostgresTx", "Result", "to_psycopg"]

T = TypeVar("T")


def to_psycopg(sql: str, params: Sequence[Any] | Mapping[str, Any] | None) -> str:
    """Rewrite ``?`` (or ``:name`` when ``params`` is a mapping) placeholders as psycopg's.

    Literal ``%`` signs are doubled, as psycopg requires whenever parameters are passed. Without
    parameters the SQL is returned unchanged (psycopg does not parse it then).
    """
    if not params:
        return sql
    named = isinstance(params, Mapping)
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"":
            end = _skip_quoted(sql, i, ch)
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif sql.startswith("--", i):
            end = sql.find("\n", i)
            end = n if end < 0 else end
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            end = n if end < 0 else end + 2
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif ch == "%":
            out.append("%%")
            i += 1
        elif ch == "?" and not named:
            out.append("%s")
            i += 1
        elif (
            ch == ":"
            and named
            and i + 1 < n
            and (sql[i + 1].isalpha() or sql[i + 1] == "_")
            and (i == 0 or sql[i - 1] != ":")
        ):
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] == "_"):
                j += 1
            out.append(f"%({sql[i + 1 : j]})s")
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _skip_quoted(sql: str, start: int, quote: str) -> int:
    """Index just past the literal or identifier opened at ``start`` (doubled quotes escape)."""
    i = start + 1
    while i < len(sql):
        if sql[i] == quote:
            if i + 1 < len(sql) and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return len(sql)


class Result:
    """What a :class:`PostgresTx` statement returned: its rows (if any) and affected row count."""

    def __init__(self, rows: list[tuple[Any, ...]], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount
        self._next = 0

    def fetchone(self) -> tuple[Any, ...] | None:
        if self._next >= len(self.rows):
            return None
        self._next += 1
        return self.rows[self._next - 1]

    def fetchall(self) -> list[tuple[Any, ...]]:
        rest = self.rows[self._next :]
        self._next = len(self.rows)
        return rest


class PostgresTx:
    """:class:`~tidings.store.tracking.Tx` for synchronous code running in a worker thread.

    Every call runs on ``connection`` (in an open transaction) on the event loop ``loop``, and
    blocks the calling thread until it is done. Must not be used from the loop's own thread.
    Driver errors are raised as ``translate`` makes them (the store's :func:`translate`), so that
    code running SQL here learns whether a retry can help.
    """

    dialect = "postgresql"

    def __init__(
        self,
        connection: psycopg.AsyncConnection[Any],
        loop: asyncio.AbstractEventLoop,
        translate: Callable[[BaseException], TidingsError],
    ) -> None:
        self.connection = connection
        self.loop = loop
        self.translate = translate
        self.closed = False

    def close(self) -> None:
        """Refuse further statements (the transaction is being abandoned)."""
        self.closed = True

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self.closed:
            coro.close()
            raise StoreError("the transaction was cancelled; no further statements run in it")
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop).result()
        except (psycopg.Error, UnicodeEncodeError, OverflowError) as exc:
            raise self.translate(exc) from exc

    async def _execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any]) -> Result:
        cur = await self.connection.execute(to_psycopg(sql, params), params or None)
        rows = await cur.fetchall() if cur.description is not None else []
        return Result(rows, cur.rowcount)

    async def _executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Result:
        if not rows:
            return Result([], 0)
        async with self.connection.cursor() as cur:
            await cur.executemany(to_psycopg(sql, rows[0]), rows)
            return Result([], cur.rowcount)

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Result:
        return self._run(self._execute(sql, params))

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Result:
        return self._run(self._executemany(sql, rows))

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return self.execute(sql, params).fetchone()

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.execute(sql, params).fetchall()


class PostgresTransaction:
    """An open transaction on one of the store's connections (see :meth:`PostgresStore._begin`).

    ``connection`` runs the caller's own statements; :meth:`append` appends in the same transaction.
    """

    def __init__(self, store: PostgresStore, connection: psycopg.AsyncConnection[Any]) -> None:
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
            [outcome] = await append_locked(self.connection, self.store._sql, self.store._channel, [request])
        except psycopg.Error as exc:
            raise self.store._translate(exc) from exc
        if isinstance(outcome, TidingsError):
            raise outcome
        self.appended = self.appended or bool(request.events)
        return outcome
