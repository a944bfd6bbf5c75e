"""Event stores: the :class:`EventStore` contract and its backends, chosen by URL.

* ``memory://`` — in process memory (tests, tooling);
* ``sqlite:///path.db`` — the embedded default, one file, zero set-up;
* ``postgresql://user@host/db`` — PostgreSQL, for many processes and machines
  (``pip install 'tidings[postgres]'``).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tidings.errors import InvalidArgument
from tidings.events import EventRegistry
from tidings.store.base import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    EventStore,
    ExpectedVersion,
    Snapshot,
    StreamInfo,
)

__all__ = [
    "ANY",
    "NO_STREAM",
    "STREAM_EXISTS",
    "AppendResult",
    "EventStore",
    "ExpectedVersion",
    "Snapshot",
    "StreamInfo",
    "open_store",
]


def open_store(url: str, *, registry: EventRegistry | None = None) -> EventStore:
    """Create the store for ``url``; use it as ``async with open_store(url) as store:``.

    The store connects (and creates its schema if needed) when entered or on ``await
    store.open()``. Raises :class:`~tidings.InvalidArgument` for an unknown scheme or a malformed
    URL, and :class:`~tidings.MissingExtra` when the backend's extra is not installed.
    """
    if not isinstance(url, str) or not url:
        raise InvalidArgument(f"store URL must be a non-empty string, got {url!r}")
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from tidings.store.memory import MemoryStore

        return MemoryStore(url, registry=registry)
    if scheme == "sqlite":
        from tidings.store.sqlite import SQLiteStore

        return SQLiteStore(url, registry=registry)
    if scheme in ("postgresql", "postgres"):
        from tidings.store.postgres import PostgresStore

        return PostgresStore(url, registry=registry)
    raise InvalidArgument(
        f"unknown store URL scheme {scheme!r} in {url!r}; use memory://, sqlite:///path.db or "
        "postgresql://..."
    )
