"""The PostgreSQL store's transactions: :class:`PostgresTransaction` (async, can append) and the
synchronous :class:`PostgresTx` handed to projection and handler code.

Projection code is synchronous (:class:`~tidings.store.tracking.Tx`): it runs inside a store
transaction and calls ``tx.execute(...)`` without awaiting. On PostgreSQL the transaction lives on
an async psycopg connection owned by the event loop, so the synchronous code runs in a worker
thread and each of its calls is handed to the loop (``run_coroutine_threadsafe``) and waited for.
The loop stays free meanwhile; there is one async code path to the database, not two.

``Tx`` speaks ``?`` placeholders (and ``:name`` with a mapping) on every backend; they are turned
into psycopg's ``%s`` / ``%(name)s`` by :func:`to_psycopg`, outside string literals (``'...'``,
``E'...'``, ``$$...$$``, ``$tag$...$tag$``), quoted identifiers and comments. ``%`` needs no
escaping (``LIKE 'a%'``, ``7 % 2``), with or without parameters.

PostgreSQL's JSON operators ``?``, ``?|`` and ``?&`` collide with the placeholder: write them
doubled -- ``data ?? 'sku'``, ``data ??| array['a', 'b']``, ``data ??& array['a', 'b']`` -- or use
the equivalent functions ``jsonb_exists(data, 'sku')``, ``jsonb_exists_any(data, array[...])``
and ``jsonb_exists_all(data, array[...])``, which need no escape.
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
    """Rewrite ``sql`` for psycopg, to be executed *with* ``params`` (pass ``()`` for none, never None).

    Outside string literals, quoted identifiers, dollar-quoted strings and comments:

    * ``?`` becomes ``%s`` (positional parameters), or ``:name`` becomes ``%(name)s`` when
      ``params`` is a mapping (``::`` casts are left alone);
    * ``??`` becomes a literal ``?``, so that PostgreSQL's JSON operators can be written:
      ``data ?? 'key'``, ``data ??| array['a']``, ``data ??& array['a']`` (or, portable and
      needing no escape, ``jsonb_exists(data, 'key')``, ``jsonb_exists_any``, ``jsonb_exists_all``).

    Everywhere, ``%`` is doubled: psycopg parses the statement whenever parameters are passed, even
    an empty sequence, and turns ``%%`` back into ``%``. The recognised lexical elements are those
    of PostgreSQL: ``'...'`` (``''`` inside), ``E'...'`` (backslash escapes too), ``"..."``,
    ``$$...$$`` and ``$tag$...$tag$``, ``-- ...`` to the end of the line and (nested) ``/* ... */``.
    An unterminated element runs to the end of the statement (the server then reports the error).
    """
    named = isinstance(params, Mapping)
    out: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        end = _skip_element(sql, i)
        if end > i:
            out.append(sql[i:end].replace("%", "%%"))
            i = end
        elif ch == "%":
            out.append("%%")
            i += 1
        elif ch == "?" and sql.startswith("??", i):
            out.append("?")
            i += 2
        elif ch == "?" and not named:
            out.append("%s")
            i += 1
        elif ch == ":" and named and _is_name_start(sql, i + 1) and (i == 0 or sql[i - 1] != ":"):
            j = i + 1
            while j < n and _is_ident(sql[j]):
                j += 1
            out.append(f"%({sql[i + 1 : j]})s")
            i = j
        elif _is_ident(ch):
            # A whole identifier or keyword at once: an E or a $ inside one starts nothing.
            j = i + 1
            while j < n and (_is_ident(sql[j]) or sql[j] == "$"):
                j += 1
            if j < n and sql[j] == "'" and sql[i:j] in ("E", "e"):
                j = _skip_quoted(sql, j, "'", backslash=True)
            out.append(sql[i:j].replace("%", "%%"))
            i = j
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _is_ident(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def _is_name_start(sql: str, i: int) -> bool:
    return i < len(sql) and (sql[i].isalpha() or sql[i] == "_")


def _skip_element(sql: str, i: int) -> int:
    """Index just past the literal, quoted identifier or comment starting at ``i``, else ``i``."""
    ch = sql[i]
    if ch in "'\"":
        return _skip_quoted(sql, i, ch, backslash=False)
    if sql.startswith("--", i):
        end = sql.find("\n", i)
        return len(sql) if end < 0 else end
    if sql.startswith("/*", i):
        depth, j = 1, i + 2
        while j < len(sql) and depth:
            if sql.startswith("/*", j):
                depth, j = depth + 1, j + 2
            elif sql.startswith("*/", j):
                depth, j = depth - 1, j + 2
            else:
                j += 1
        return j
    if ch == "$":
        # $$ or $tag$ (a tag is an identifier without $); $1 is a parameter, not a quote.
        j = i + 1
        if j < len(sql) and (sql[j].isalpha() or sql[j] == "_"):
            while j < len(sql) and _is_ident(sql[j]):
                j += 1
        if j < len(sql) and sql[j] == "$":
            tag = sql[i : j + 1]
            end = sql.find(tag, j + 1)
            return len(sql) if end < 0 else end + len(tag)
    return i


def _skip_quoted(sql: str, start: int, quote: str, *, backslash: bool) -> int:
    """Index just past the literal or identifier opened at ``start``: doubled quotes escape, and
    in an ``E'...'`` string (``backslash``) so does a backslash."""
    i = start + 1
    while i < len(sql):
        if backslash and sql[i] == "\\":
            i += 2
            continue
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

    SQL is translated by :func:`to_psycopg`: ``?`` (or ``:name``) placeholders, ``??`` for a literal
    ``?`` (the JSON operators: ``items ?? 'sku'``, ``items ??| array['a']``, ``items ??& array['a']``;
    or ``jsonb_exists(items, 'sku')`` and friends), ``%`` as is.

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
        cur = await self.connection.execute(to_psycopg(sql, params), params)
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
