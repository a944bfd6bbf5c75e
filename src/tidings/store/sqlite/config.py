"""The SQLite backend's options, read from its URL, and how it opens a connection."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from urllib.parse import parse_qs, unquote, urlsplit

from tidings.errors import CorruptStore, InvalidArgument

__all__ = ["SQLiteConfig", "connect", "sqlite_path_exists"]


@dataclasses.dataclass(frozen=True, slots=True)
class SQLiteConfig:
    """Options of the SQLite backend, read from the URL's query string.

    ``synchronous``: ``full`` (default, durable on power loss) or ``normal`` (durable on process
    crash; the last commits may be lost on power loss). ``busy_timeout`` in milliseconds bounds how
    long a write waits for another process holding the file's write lock.
    """

    path: str
    synchronous: str = "full"
    busy_timeout: int = 10_000

    @classmethod
    def from_url(cls, url: str) -> SQLiteConfig:
        """Parse ``url``; raise :class:`~tidings.InvalidArgument` for a malformed URL or option."""
        parts = urlsplit(url)
        if parts.scheme != "sqlite":
            raise InvalidArgument(f"not a sqlite URL: {url!r}")
        # sqlite:///rel.db -> "rel.db"; sqlite:////abs/x.db -> "/abs/x.db"
        raw = unquote(parts.netloc + parts.path)
        path = raw[1:] if raw.startswith("/") else raw
        if not path or path == ":memory:":
            raise InvalidArgument(
                f"{url!r}: give the database file, e.g. sqlite:///tidings.db (use memory:// for a "
                "store that is not kept)"
            )
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        unknown = set(options) - {"synchronous", "busy_timeout"}
        if unknown:
            raise InvalidArgument(f"{url!r}: unknown option(s) {', '.join(sorted(unknown))}")
        sync = options.get("synchronous", "full").lower()
        if sync not in ("full", "normal"):
            raise InvalidArgument(f"{url!r}: synchronous must be 'full' or 'normal', not {sync!r}")
        try:
            busy = int(options.get("busy_timeout", "10000"))
        except ValueError:
            raise InvalidArgument(f"{url!r}: busy_timeout must be milliseconds") from None
        return cls(path=path, synchronous=sync, busy_timeout=busy)


def connect(config: SQLiteConfig) -> sqlite3.Connection:
    """A connection to ``config.path`` in autocommit mode, WAL, with the configured durability and
    busy timeout; usable from any thread (the caller serialises its use).

    Raises :class:`~tidings.CorruptStore` if the file is not a usable SQLite database.
    """
    try:
        conn = sqlite3.connect(config.path, isolation_level=None, check_same_thread=False, timeout=0)
        conn.execute(f"PRAGMA busy_timeout = {config.busy_timeout}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {config.synchronous.upper()}")
        conn.execute("PRAGMA cache_size = -65536")
    except sqlite3.DatabaseError as exc:
        raise CorruptStore(f"{config.path!r} is not a usable SQLite database: {exc}") from exc
    return conn


def sqlite_path_exists(url: str) -> bool:
    """Whether the file behind a sqlite URL exists (used by the CLI to avoid creating one)."""
    return os.path.exists(SQLiteConfig.from_url(url).path)
