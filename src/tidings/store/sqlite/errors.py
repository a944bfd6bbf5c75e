"""sqlite3's errors translated into the :class:`~tidings.TidingsError` family, in one place.

What matters to a caller is whether to retry: a locked or busy database (another process holds the
write lock past the busy timeout) is :class:`~tidings.StoreUnavailable`, transient; a statement the
database refuses as written (syntax, unknown table or column, a value that cannot be bound, a
read-only file) is :class:`~tidings.StatementError`, permanent; a broken constraint is
:class:`~tidings.IntegrityError`; a file that is not a database, or a damaged one, is
:class:`~tidings.CorruptStore`. The driver's error is chained (``raise ... from exc``), never leaked.
"""

from __future__ import annotations

import sqlite3
from typing import Final

from tidings.errors import (
    CorruptStore,
    IntegrityError,
    StatementError,
    StoreError,
    StoreUnavailable,
    TidingsError,
)

__all__ = ["BINDING_ERRORS", "translate"]

BINDING_ERRORS: Final = (OverflowError, UnicodeEncodeError)
"""Errors the sqlite3 module raises, outside its own hierarchy, for a parameter it cannot bind
(an int beyond 64 bits, a str with a lone surrogate)."""

# Primary result codes (https://sqlite.org/rescode.html); extended codes carry them in the low byte.
_BUSY, _LOCKED, _READONLY, _CORRUPT, _CONSTRAINT, _NOTADB = 5, 6, 8, 11, 19, 26
_STATEMENT_CODES: Final = frozenset({1, 18, 20, 25})  # ERROR (syntax, no such table), TOOBIG, MISMATCH, RANGE


def translate(exc: BaseException, path: str) -> TidingsError:
    """The :class:`TidingsError` for ``exc``, raised by sqlite3 on the database at ``path``.

    Chain it: ``raise translate(exc, path) from exc``. A :class:`TidingsError` is returned unchanged.
    """
    if isinstance(exc, TidingsError):
        return exc
    where = f"SQLite database {path!r}"
    if isinstance(exc, BINDING_ERRORS):
        return StatementError(f"{where}: a value cannot be stored: {type(exc).__name__}: {exc}")
    if not isinstance(exc, sqlite3.Error):
        return StoreError(f"{where}: {type(exc).__name__}: {exc}")
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    message = f"{where}: {exc}"
    if primary in (_BUSY, _LOCKED) or _says(exc, "database is locked", "database is busy"):
        return StoreUnavailable(f"{message} (another connection holds the lock; retry later)")
    if primary in (_CORRUPT, _NOTADB) or _says(exc, "not a database", "malformed"):
        return CorruptStore(f"{where} is corrupt or not a SQLite database: {exc}")
    if isinstance(exc, sqlite3.IntegrityError) or primary == _CONSTRAINT:
        return IntegrityError(message)
    if primary == _READONLY or primary in _STATEMENT_CODES:
        return StatementError(message)
    if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError | sqlite3.DataError):
        # Raised by the module before SQLite runs anything: wrong number of parameters, an
        # unsupported parameter type, a statement on a closed cursor.
        return StatementError(message)
    if isinstance(exc, sqlite3.NotSupportedError):
        return StatementError(message)
    return StoreError(message)


def _says(exc: BaseException, *phrases: str) -> bool:
    text = str(exc)
    return any(phrase in text for phrase in phrases)
