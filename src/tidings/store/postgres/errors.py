"""Translation of psycopg's errors into the :class:`~tidings.TidingsError` family."""

from __future__ import annotations

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from tidings.errors import CorruptStore, StoreError, TidingsError

__all__ = ["translate"]


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
