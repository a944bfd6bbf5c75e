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
    "Migration",
    "SchemaState",
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
