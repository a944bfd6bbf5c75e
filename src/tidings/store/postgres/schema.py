"""The PostgreSQL store's tables and their versioned migrations.

Every tidings table lives in one PostgreSQL schema (``public`` unless the URL says
``?schema=NAME``), so several stores can share a database without seeing each other. The tables
mirror the SQLite backend's, with PostgreSQL types: ``uuid`` ids, ``timestamptz`` instants, and event
data and metadata as ``bytea`` holding the registry's JSON bytes unchanged -- no JSON parsing on the
write path, and the exact bytes (key order, escapes) come back on read.

Migrations are numbered; ``tidings_migrations`` records the ones applied. :func:`migrate_schema`
applies the missing ones in one transaction under a transaction-scoped advisory lock keyed by the
schema name, so stores starting at the same moment in many processes migrate exactly once and the
others wait and then find nothing to do. A schema that was migrated by a *newer* tidings (a version
this code does not know), or that holds tidings tables without the migrations table, is refused with
:class:`~tidings.errors.CorruptStore` rather than guessed at.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Final

import psycopg

from tidings.errors import CorruptStore, InvalidArgument

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "ROW_COLUMNS",
    "Migration",
    "SchemaState",
    "Statements",
    "channel_name",
    "inspect_schema",
    "lock_key",
    "migrate_schema",
    "quote_schema",
]


@dataclasses.dataclass(frozen=True, slots=True)
class Migration:
    """One step of the schema: its number, what it does, and its DDL (``{schema}`` is substituted)."""

    version: int
    description: str
    sql: str


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "events, head, snapshots, checkpoints, inbox, projections and dead letters",
        """
CREATE TABLE {schema}.tidings_events (
    position       bigint      PRIMARY KEY,
    stream_id      text        COLLATE "C" NOT NULL,
    version        bigint      NOT NULL,
    event_id       uuid        NOT NULL,
    event_type     text        COLLATE "C" NOT NULL,
    schema_version integer     NOT NULL,
    timestamp      timestamptz NOT NULL,
    data           bytea       NOT NULL,
    metadata       bytea,
    CONSTRAINT tidings_events_stream UNIQUE (stream_id, version),
    CONSTRAINT tidings_events_id UNIQUE (event_id)
);
-- The global position counter: its single row is locked by every append until commit, which makes
-- commit order equal position order (see tidings.store.postgres). It always equals the highest
-- committed position.
CREATE TABLE {schema}.tidings_head (
    id       boolean PRIMARY KEY DEFAULT true CHECK (id),
    position bigint  NOT NULL
);
INSERT INTO {schema}.tidings_head (id, position) VALUES (true, 0);
CREATE TABLE {schema}.tidings_snapshots (
    stream_id      text    COLLATE "C" NOT NULL,
    version        bigint  NOT NULL,
    aggregate_type text    NOT NULL,
    schema         text    NOT NULL,
    state          bytea   NOT NULL,
    PRIMARY KEY (stream_id, version)
);
CREATE TABLE {schema}.tidings_checkpoints (
    group_name text        COLLATE "C" PRIMARY KEY,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE {schema}.tidings_inbox (
    group_name text   COLLATE "C" NOT NULL,
    event_id   uuid   NOT NULL,
    position   bigint NOT NULL,
    PRIMARY KEY (group_name, event_id)
);
CREATE TABLE {schema}.tidings_projections (
    name       text    COLLATE "C" PRIMARY KEY,
    generation integer NOT NULL,
    building   integer
);
CREATE TABLE {schema}.tidings_dead_letters (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    group_name  text        COLLATE "C" NOT NULL,
    position    bigint      NOT NULL,
    event_id    uuid        NOT NULL,
    stream_id   text        COLLATE "C" NOT NULL,
    event_type  text        COLLATE "C" NOT NULL,
    error       text        NOT NULL,
    traceback   text        NOT NULL,
    attempts    integer     NOT NULL,
    failed_at   timestamptz NOT NULL,
    UNIQUE (group_name, event_id)
);
""",
    ),
    Migration(
        2,
        "index of the events' correlation ids (correlated reads, the causal trace)",
        # The metadata is bytea holding JSON: the function reads its correlation id, and NULL
        # for metadata that is not a JSON object or cannot be text (a \u0000 escape), so that an
        # odd row never makes a write fail. IMMUTABLE is true of it (it reads only its argument),
        # which an index expression requires; convert_from alone is only STABLE.
        # OR REPLACE and IF NOT EXISTS: on a large store the operator can build the index
        # beforehand with CREATE INDEX CONCURRENTLY (README, "PostgreSQL"), without blocking
        # appends for the build; the migration then only records itself.
        """
CREATE OR REPLACE FUNCTION {schema}.tidings_correlation_id(metadata bytea) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
BEGIN
    RETURN convert_from(metadata, 'UTF8')::json ->> 'correlation_id';
EXCEPTION WHEN others THEN
    RETURN NULL;
END
$$;
CREATE INDEX IF NOT EXISTS tidings_events_correlation ON {schema}.tidings_events
    ({schema}.tidings_correlation_id(metadata)) WHERE metadata IS NOT NULL;
""",
    ),
)

LATEST_VERSION: Final = MIGRATIONS[-1].version
"""The schema version this code reads and writes."""

TABLES: Final = frozenset(
    {
        "tidings_migrations",
        "tidings_events",
        "tidings_head",
        "tidings_snapshots",
        "tidings_checkpoints",
        "tidings_inbox",
        "tidings_projections",
        "tidings_dead_letters",
    }
)
"""The tables a schema at :data:`LATEST_VERSION` has."""

_MIGRATIONS_TABLE = """
CREATE TABLE {schema}.tidings_migrations (
    version     integer     PRIMARY KEY,
    description text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""

# Namespace of tidings' advisory lock keys (two-int form: this class id, hashtext(schema)), so they
# do not collide with the application's own single-key advisory locks.
_LOCK_CLASS: Final = 0x74696469  # "tidi"

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def quote_schema(name: str) -> str:
    """Validate a schema name and return it quoted for SQL.

    Accepted: 1-63 ASCII letters, digits and underscores, not starting with a digit and not
    starting with ``pg_`` (reserved by PostgreSQL). The name is used exactly (quoted), so
    ``MySchema`` and ``myschema`` are different schemas. Raises :class:`InvalidArgument`.
    """
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise InvalidArgument(
            f"schema name {name!r} must be 1-63 letters, digits or underscores, not starting with a digit"
        )
    if name.lower().startswith("pg_"):
        raise InvalidArgument(
            f"schema name {name!r} is reserved: names starting with pg_ belong to PostgreSQL"
        )
    return f'"{name}"'


def channel_name(schema: str) -> str:
    """The LISTEN/NOTIFY channel on which appends to ``schema`` are announced.

    Channel names are identifiers (at most 63 bytes), so long schema names are hashed; the ``#``
    keeps a hashed name from ever equalling a readable one.
    """
    readable = f"tidings:{schema}"
    if len(readable) <= 63:
        return readable
    return "tidings#" + hashlib.sha256(schema.encode()).hexdigest()[:40]


def lock_key(schema: str, name: str) -> int:
    """A 64-bit advisory lock key for ``name`` within ``schema`` (e.g. a subscription group)."""
    digest = hashlib.blake2b(f"tidings\x00{schema}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaState:
    """What :func:`inspect_schema` found: applied migration versions and tidings tables present."""

    schema: str
    applied: tuple[int, ...]
    tables: frozenset[str]

    @property
    def pending(self) -> list[int]:
        """Versions still to apply (all of them for a schema without tidings tables)."""
        done = set(self.applied)
        return [m.version for m in MIGRATIONS if m.version not in done]

    def check(self) -> None:
        """Raise :class:`CorruptStore` unless this schema is a tidings store this code can use
        (possibly an older one that migrations will bring up to date)."""
        where = f"PostgreSQL schema {self.schema!r}"
        if "tidings_migrations" not in self.tables:
            if self.tables:
                raise CorruptStore(
                    f"{where} has tidings tables ({', '.join(sorted(self.tables))}) but no "
                    "tidings_migrations table: it was not created by tidings, or was damaged"
                )
            return
        newer = [v for v in self.applied if v > LATEST_VERSION]
        if newer:
            raise CorruptStore(
                f"{where} is at tidings schema version {max(newer)}; this version of tidings knows "
                f"versions up to {LATEST_VERSION}. Upgrade tidings to use this store"
            )
        if list(self.applied) != list(range(1, len(self.applied) + 1)):
            raise CorruptStore(f"{where} records an impossible set of applied migrations {self.applied}")
        expected = {"tidings_migrations"} | (TABLES if not self.pending else set())
        missing = expected - self.tables
        if missing:
            raise CorruptStore(
                f"{where} is at tidings schema version {max(self.applied, default=0)} but lacks the "
                f"tables {', '.join(sorted(missing))}"
            )


async def inspect_schema(conn: psycopg.AsyncConnection[Any], schema: str) -> SchemaState:
    """Read which tidings tables and applied migrations ``schema`` has (a missing schema has none)."""
    cur = await conn.execute(
        "SELECT c.relname FROM pg_catalog.pg_class c "
        "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f') "
        "AND c.relname LIKE 'tidings\\_%%'",
        (schema,),
    )
    tables = frozenset(str(row[0]) for row in await cur.fetchall())
    applied: tuple[int, ...] = ()
    if "tidings_migrations" in tables:
        try:
            cur = await conn.execute(
                f"SELECT version FROM {quote_schema(schema)}.tidings_migrations ORDER BY 1"
            )
            applied = tuple(int(row[0]) for row in await cur.fetchall())
        except (psycopg.errors.UndefinedColumn, psycopg.errors.DataError) as exc:
            raise CorruptStore(
                f"PostgreSQL schema {schema!r} has a foreign tidings_migrations table: {exc}"
            ) from exc
    return SchemaState(schema, applied, tables)


async def migrate_schema(conn: psycopg.AsyncConnection[Any], schema: str) -> list[int]:
    """Bring ``schema`` up to :data:`LATEST_VERSION`; return the versions applied (``[]`` if none).

    Creates the schema if needed. Runs in one transaction holding an advisory lock for this schema,
    so concurrent callers apply each migration exactly once. ``conn`` must be in autocommit mode
    (outside a transaction). Raises :class:`CorruptStore` for a schema it must not touch; driver
    errors propagate for the caller to translate.
    """
    quoted = quote_schema(schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_CLASS, schema))
        # Read the state only after the lock: READ COMMITTED gives this statement a snapshot that
        # includes whatever a concurrent migrator committed before releasing it.
        state = await inspect_schema(conn, schema)
        state.check()
        pending = state.pending
        if not pending:
            return []
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        if "tidings_migrations" not in state.tables:
            await conn.execute(_MIGRATIONS_TABLE.format(schema=quoted))
        for migration in MIGRATIONS:
            if migration.version in pending:
                await conn.execute(migration.sql.format(schema=quoted))
                await conn.execute(
                    f"INSERT INTO {quoted}.tidings_migrations (version, description) VALUES (%s, %s)",
                    (migration.version, migration.description),
                )
        return pending


ROW_COLUMNS: Final = (
    "position, stream_id, version, event_id, event_type, schema_version, timestamp, data, metadata"
)
"""The columns of a stored event, in the order of :data:`tidings.store.base.Row`."""


class Statements:
    """The statements of one schema, built once (the schema name is a validated identifier)."""

    def __init__(self, schema: str) -> None:
        s = quote_schema(schema)
        self.lock_head = f"SELECT position FROM {s}.tidings_head FOR UPDATE"
        self.head = f"SELECT position FROM {s}.tidings_head"
        # One statement answers both questions an append batch has: each stream's last version
        # and position (kind 0), and where any explicitly given event ids are already stored
        # (kind 1). The lateral LIMIT 1 is a backward scan of the (stream_id, version) index.
        self.lookup = (
            "SELECT 0, s.stream_id, e.version, e.position, NULL::uuid "
            "FROM unnest(%b::text[]) AS s(stream_id) LEFT JOIN LATERAL ("
            f"  SELECT version, position FROM {s}.tidings_events AS t "
            "   WHERE t.stream_id = s.stream_id ORDER BY version DESC LIMIT 1"
            ") AS e ON true "
            "UNION ALL "
            f"SELECT 1, stream_id, version, position, event_id FROM {s}.tidings_events "
            "WHERE event_id = ANY(%b::uuid[])"
        )
        # Takes the next n positions (row-locking the counter until commit), inserts every event of
        # the batch in one go, and announces the new head. The timestamp is read once, after the
        # lock, so timestamps never decrease along the log. Data-modifying CTEs always run to
        # completion, whether or not the outer query reads them.
        self.insert = (
            f"WITH head AS (UPDATE {s}.tidings_head SET position = position + %(n)s "
            "  RETURNING position - %(n)s AS base), "
            "now AS (SELECT clock_timestamp() AS ts FROM head), "
            f"ins AS (INSERT INTO {s}.tidings_events ({ROW_COLUMNS}) "
            "  SELECT head.base + u.ord, u.stream_id, u.version, u.event_id, u.event_type, "
            "         u.schema_version, now.ts, u.data, u.metadata "
            "  FROM head, now, unnest(%(streams)b::text[], %(versions)b::int8[], %(ids)b::uuid[], "
            "       %(types)b::text[], %(schemas)b::int4[], %(data)b::bytea[], %(meta)b::bytea[]) "
            "       WITH ORDINALITY AS u(stream_id, version, event_id, event_type, schema_version, "
            "                            data, metadata, ord)) "
            "SELECT head.base, pg_notify(%(channel)s, (head.base + %(n)s)::text) FROM head"
        )
        self.stream = f"SELECT {ROW_COLUMNS} FROM {s}.tidings_events WHERE stream_id = %s AND version > %s"
        self.all = f"SELECT {ROW_COLUMNS} FROM {s}.tidings_events WHERE position > %s"
        # The positions come from the correlation and event id indexes (an InitPlan, run once);
        # the rows are then read by primary key. A plain OR would let the planner walk the log in
        # position order for the LIMIT. "position > %s" inside both: a later page does not
        # probe the positions of the pages before it.
        self.correlated = (
            f"SELECT {ROW_COLUMNS} FROM {s}.tidings_events WHERE position = ANY(ARRAY("
            f"  SELECT position FROM {s}.tidings_events WHERE metadata IS NOT NULL "
            f"  AND {s}.tidings_correlation_id(metadata) = ANY(%s::text[]) AND position > %s "
            f"  UNION SELECT position FROM {s}.tidings_events WHERE event_id = ANY(%s::uuid[]) "
            "  AND position > %s)) ORDER BY position LIMIT %s"
        )
        # Skip scan over the (stream_id, version) index: one index probe per stream listed, instead
        # of a GROUP BY over every event. The recursion counts its rows, so it stops at the page
        # size; with the "C" collation, the ids starting with a prefix are contiguous.
        streams = (
            "WITH RECURSIVE ids(stream_id, n) AS ("
            f"  (SELECT stream_id, 1 FROM {s}.tidings_events WHERE stream_id {{op}} %(start)s "
            "    ORDER BY stream_id LIMIT 1) "
            "  UNION ALL "
            f"  SELECT (SELECT t.stream_id FROM {s}.tidings_events AS t "
            "          WHERE t.stream_id > ids.stream_id ORDER BY t.stream_id LIMIT 1), ids.n + 1 "
            "  FROM ids WHERE ids.stream_id IS NOT NULL AND ids.n < %(limit)s "
            "  AND starts_with(ids.stream_id, %(prefix)s)"
            ") "
            "SELECT ids.stream_id, last.version, last.position FROM ids CROSS JOIN LATERAL ("
            f"  SELECT version, position FROM {s}.tidings_events AS t "
            "   WHERE t.stream_id = ids.stream_id ORDER BY version DESC LIMIT 1"
            ") AS last "
            "WHERE ids.stream_id IS NOT NULL AND starts_with(ids.stream_id, %(prefix)s) "
            "ORDER BY ids.stream_id"
        )
        self.streams_after = streams.format(op=">")
        self.streams_from = streams.format(op=">=")
        self.version = (
            f"SELECT version FROM {s}.tidings_events WHERE stream_id = %s ORDER BY version DESC LIMIT 1"
        )
        self.version_at = (
            f"SELECT max(version) FROM {s}.tidings_events WHERE stream_id = %s AND timestamp <= %s"
        )
        self.save_snapshot = (
            f"INSERT INTO {s}.tidings_snapshots (stream_id, version, aggregate_type, schema, state) "
            "VALUES (%s, %s, %s, %s, %b) ON CONFLICT (stream_id, version) DO UPDATE SET "
            "aggregate_type = excluded.aggregate_type, schema = excluded.schema, state = excluded.state"
        )
        self.load_checkpoint = f"SELECT position FROM {s}.tidings_checkpoints WHERE group_name = %s"
        self.checkpoints = f"SELECT group_name, position FROM {s}.tidings_checkpoints"
        self.save_checkpoint = (
            f"INSERT INTO {s}.tidings_checkpoints (group_name, position, updated_at) "
            "VALUES (%s, %s, now()) ON CONFLICT (group_name) DO UPDATE SET "
            "position = excluded.position, updated_at = excluded.updated_at"
        )
        self.delete_checkpoint = f"DELETE FROM {s}.tidings_checkpoints WHERE group_name = %s"
        self.delete_inbox = f"DELETE FROM {s}.tidings_inbox WHERE group_name = %s"
        self.save_inbox = (
            f"INSERT INTO {s}.tidings_inbox (group_name, event_id, position) "
            "SELECT %s, u.event_id, u.position FROM unnest(%s::uuid[], %s::int8[]) AS u(event_id, position) "
            "ON CONFLICT DO NOTHING"
        )
        self.processed_ids = (
            f"SELECT event_id FROM {s}.tidings_inbox WHERE group_name = %s AND event_id = ANY(%s::uuid[])"
        )
        self.save_dead_letter = (
            f"INSERT INTO {s}.tidings_dead_letters (group_name, position, event_id, stream_id, "
            "event_type, error, traceback, attempts, failed_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now()) ON CONFLICT (group_name, event_id) DO UPDATE SET "
            "position = excluded.position, stream_id = excluded.stream_id, "
            "event_type = excluded.event_type, error = excluded.error, traceback = excluded.traceback, "
            "attempts = tidings_dead_letters.attempts + excluded.attempts, failed_at = excluded.failed_at"
        )
        self.dead_letters = (
            "SELECT id, group_name, position, event_id, stream_id, event_type, error, traceback, "
            f"attempts, failed_at FROM {s}.tidings_dead_letters WHERE true"
        )
        self.delete_dead_letter = f"DELETE FROM {s}.tidings_dead_letters WHERE id = %s"
        self.load_snapshot = (
            f"SELECT stream_id, version, aggregate_type, schema, state FROM {s}.tidings_snapshots "
            "WHERE stream_id = %s AND version <= %s ORDER BY version DESC LIMIT 1"
        )
