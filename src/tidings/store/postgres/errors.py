"""psycopg's errors translated into the :class:`~tidings.TidingsError` family, in one place.

The SQLSTATE class says whether a retry can help (https://www.postgresql.org/docs/current/errcodes-appendix.html):

* :class:`~tidings.StoreUnavailable` (transient) -- ``08`` connection exceptions, ``53`` insufficient
  resources (too many connections, disk full, out of memory), ``57P01``/``57P02``/``57P03``/``57P05``
  (admin or crash shutdown, cannot connect now, idle session timeout), ``57014`` query canceled (a
  statement timeout), ``40001``/``40P01`` serialization failure and deadlock, ``55P03`` lock not
  available; also a connection lost without a SQLSTATE (``psycopg.OperationalError``) and
  ``psycopg_pool.PoolTimeout`` / ``PoolClosed``;
* :class:`~tidings.StatementError` (permanent) -- ``42`` syntax or access rule violations (unknown
  table or column, wrong type), ``22`` data exceptions (overflow, invalid text), ``0A`` feature not
  supported, ``25`` invalid transaction state (a read-only transaction), and values the driver cannot
  send;
* :class:`~tidings.IntegrityError` -- ``23`` integrity constraint violations;
* :class:`~tidings.CorruptStore` -- tidings' own tables missing or altered.

Anything else is a plain :class:`~tidings.StoreError`. The driver's error is always chained.
"""

from __future__ import annotations

from typing import Final

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolClosed, PoolTimeout

from tidings.errors import (
    CorruptStore,
    IntegrityError,
    StatementError,
    StoreError,
    StoreUnavailable,
    TidingsError,
)

__all__ = ["translate"]

_TRANSIENT_CLASSES: Final = frozenset({"08", "53"})
_TRANSIENT_STATES: Final = frozenset({"57P01", "57P02", "57P03", "57P05", "57014", "40001", "40P01", "55P03"})
_STATEMENT_CLASSES: Final = frozenset({"42", "22", "0A", "25"})


def translate(exc: BaseException, where: str, schema: str, doing: str = "error on") -> TidingsError:
    """The :class:`TidingsError` for ``exc``, raised by psycopg while ``doing`` something with the
    store at ``where`` (tables in ``schema``). Chain it: ``raise translate(...) from exc``.

    A :class:`TidingsError` is returned unchanged.
    """
    if isinstance(exc, TidingsError):
        return exc
    if isinstance(exc, PoolTimeout):
        return StoreUnavailable(f"{where}: no connection to PostgreSQL became available in time ({exc})")
    if isinstance(exc, PoolClosed):
        return StoreUnavailable(f"{where}: the connection pool was replaced while waiting ({exc})")
    detail = str(exc).strip() or type(exc).__name__
    if isinstance(exc, UnicodeEncodeError | OverflowError):
        return StatementError(
            f"PostgreSQL {doing} {where}: a value cannot be sent: {type(exc).__name__}: {detail}"
        )
    if not isinstance(exc, psycopg.Error):
        return StoreError(f"PostgreSQL {doing} {where}: {type(exc).__name__}: {detail}")
    # Missing or altered tidings tables mean the store is damaged; the same errors about the
    # caller's own tables (projection SQL, queries) are statement errors.
    if (
        isinstance(exc, pg_errors.UndefinedTable | pg_errors.UndefinedColumn | pg_errors.DatatypeMismatch)
        and "tidings_" in str(exc)
    ) or isinstance(exc, pg_errors.InvalidSchemaName):
        return CorruptStore(
            f"{where}: the tidings tables in PostgreSQL schema {schema!r} are missing or were altered: {exc}"
        )
    state = exc.sqlstate
    if state is None:
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
            # The connection broke or could not be made (no server answer, so no SQLSTATE).
            return StoreUnavailable(f"{doing} PostgreSQL at {where}: {detail}")
        if isinstance(exc, psycopg.ProgrammingError | psycopg.DataError | psycopg.NotSupportedError):
            # Refused by the driver before sending: wrong parameters, a value it cannot adapt.
            return StatementError(f"PostgreSQL {doing} {where}: {type(exc).__name__}: {detail}")
        return StoreError(f"PostgreSQL {doing} {where}: {type(exc).__name__}: {detail}")
    message = f"PostgreSQL {doing} {where}: {type(exc).__name__} (SQLSTATE {state}): {detail}"
    if state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES:
        return StoreUnavailable(message)
    if state[:2] == "23":
        return IntegrityError(message)
    if state[:2] in _STATEMENT_CLASSES:
        return StatementError(message)
    return StoreError(message)
