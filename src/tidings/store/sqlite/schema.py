"""The SQLite store's tables, and their creation and version check when a store opens."""

from __future__ import annotations

import sqlite3
from typing import Final

from tidings.errors import CorruptStore

__all__ = ["CORRELATION", "ROW_COLUMNS", "SCHEMA_VERSION", "check_schema", "init_schema"]

SCHEMA_VERSION: Final = 1
"""Version of the on-disk schema, stored in ``tidings_meta``; bumped by migrations."""

ROW_COLUMNS: Final = (
    "position, stream_id, version, event_id, event_type, schema_version, timestamp, data, metadata"
)
"""The columns of a stored event, in the order of :data:`tidings.store.base.Row`."""

CORRELATION: Final = (
    "(CASE WHEN json_valid(CAST(metadata AS TEXT)) "
    "THEN CAST(json_extract(CAST(metadata AS TEXT), '$.correlation_id') AS TEXT) END)"
)
"""The metadata's correlation id as text, NULL when there is none. The expression of the
``tidings_events_correlation`` index: a query must spell it exactly so to use the index. The
``json_valid`` guard keeps a hand-edited row with broken metadata writable (it is not indexed)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tidings_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_events (
    position       INTEGER PRIMARY KEY,
    stream_id      TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    event_id       BLOB    NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    timestamp      INTEGER NOT NULL,
    data           BLOB    NOT NULL,
    metadata       BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS tidings_events_stream ON tidings_events (stream_id, version);
CREATE UNIQUE INDEX IF NOT EXISTS tidings_events_id ON tidings_events (event_id);
-- Correlated reads (the causal trace). Added without a schema version bump: it changes no table,
-- and every writable open creates it in an existing store (older tidings versions maintain it).
CREATE INDEX IF NOT EXISTS tidings_events_correlation ON tidings_events CORRELATION_EXPR
    WHERE metadata IS NOT NULL;
CREATE TABLE IF NOT EXISTS tidings_snapshots (
    stream_id      TEXT    NOT NULL,
    version        INTEGER NOT NULL,
    aggregate_type TEXT    NOT NULL,
    schema         TEXT    NOT NULL,
    state          BLOB    NOT NULL,
    PRIMARY KEY (stream_id, version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_checkpoints (
    group_name TEXT    PRIMARY KEY,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_inbox (
    group_name TEXT NOT NULL,
    event_id   BLOB NOT NULL,
    position   INTEGER NOT NULL,
    PRIMARY KEY (group_name, event_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_projections (
    name       TEXT    PRIMARY KEY,
    generation INTEGER NOT NULL,
    building   INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tidings_dead_letters (
    id          INTEGER PRIMARY KEY,
    group_name  TEXT    NOT NULL,
    position    INTEGER NOT NULL,
    event_id    BLOB    NOT NULL,
    stream_id   TEXT    NOT NULL,
    event_type  TEXT    NOT NULL,
    error       TEXT    NOT NULL,
    traceback   TEXT    NOT NULL,
    attempts    INTEGER NOT NULL,
    failed_at   INTEGER NOT NULL,
    UNIQUE (group_name, event_id)
);
"""

_SCHEMA = _SCHEMA.replace("CORRELATION_EXPR", f"({CORRELATION})")


def check_schema(conn: sqlite3.Connection, path: str) -> bool:
    """Check, reading only, that the database behind ``conn`` is empty or a tidings store of this
    schema version; return whether the tidings tables exist. Raise :class:`CorruptStore` if not.

    Runs before anything is written, so that a foreign database is refused unchanged.
    """
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "tidings_meta" in tables:
        row = conn.execute("SELECT value FROM tidings_meta WHERE key = 'schema_version'").fetchone()
        found = row[0] if row else None
        if found != str(SCHEMA_VERSION):
            raise CorruptStore(
                f"{path!r} has tidings schema version {found}; this version "
                f"of tidings reads schema version {SCHEMA_VERSION}"
            )
        return True
    if tables:
        raise CorruptStore(
            f"{path!r} is a SQLite database but not a tidings store "
            f"(it has tables {', '.join(sorted(tables)[:5])} and no tidings_meta)"
        )
    return False


def init_schema(conn: sqlite3.Connection, path: str) -> None:
    """Create the tidings tables in the database behind ``conn`` (writer connection), or check that
    an existing database is a tidings store of this schema version; raise :class:`CorruptStore` if not.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        check_schema(conn, path)
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute(
            "INSERT OR IGNORE INTO tidings_meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
