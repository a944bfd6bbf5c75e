"""The embedded default backend: an event store in one SQLite file (``sqlite:///path.db``).

* :mod:`~tidings.store.sqlite.config` -- URL options and how connections are opened;
* :mod:`~tidings.store.sqlite.schema` -- the tables;
* :mod:`~tidings.store.sqlite.writer` -- the writer thread: appends and every other write, in
  group commits;
* :mod:`~tidings.store.sqlite.store` -- :class:`SQLiteStore`, reads on a pool of reader threads;
* :mod:`~tidings.store.sqlite.tx` -- the SQL transaction handed to projections and handlers;
* :mod:`~tidings.store.sqlite.errors` -- sqlite3's errors translated into tidings' own.
"""

from tidings.store.sqlite.config import SQLiteConfig, connect, sqlite_path_exists
from tidings.store.sqlite.errors import translate
from tidings.store.sqlite.schema import SCHEMA_VERSION
from tidings.store.sqlite.store import SQLiteStore
from tidings.store.sqlite.tx import SQLiteTx
from tidings.store.sqlite.writer import SQLiteStatistics, WriteJob

__all__ = [
    "SCHEMA_VERSION",
    "SQLiteConfig",
    "SQLiteStatistics",
    "SQLiteStore",
    "SQLiteTx",
    "WriteJob",
    "connect",
    "sqlite_path_exists",
    "translate",
]
