"""Translation of sqlite3's errors into the :class:`~tidings.TidingsError` family."""

from __future__ import annotations

import sqlite3

from tidings.errors import CorruptStore, StoreError, TidingsError

__all__ = ["translate"]


def translate(exc: BaseException, path: str) -> TidingsError:
    """The :class:`TidingsError` for ``exc`` raised on the database at ``path`` (chain it with
    ``raise ... from exc``); a :class:`TidingsError` is returned unchanged."""
    if isinstance(exc, TidingsError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError) and "event_id" in str(exc):
        return StoreError(f"{path!r}: an event id is already stored: {exc}")
    if isinstance(exc, sqlite3.DatabaseError) and ("not a database" in str(exc) or "malformed" in str(exc)):
        return CorruptStore(f"{path!r} is corrupt or not a SQLite database: {exc}")
    return StoreError(f"SQLite error on {path!r}: {exc}")
