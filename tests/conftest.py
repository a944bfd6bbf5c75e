"""Fixtures shared by the whole suite.

PostgreSQL: ``postgres_server`` starts one throwaway server per flavour and test session (see
:mod:`tests.servers`) the first time a test asks for it, and stops it at the end; ``pg_url`` gives
each test a store URL on a fresh PostgreSQL schema of its own, dropped afterwards.

Tests run on the ``embedded`` flavour (or ``TIDINGS_TEST_POSTGRES_URL``). A module (or test)
marked ``pytest.mark.parametrize("postgres_flavour", servers.flavours(), scope="session")`` runs
on every flavour this machine has -- also on the distribution's stock, JIT-capable server when it
is installed -- each test once per server (ids ``[embedded]``, ``[debian]``).

When a server cannot be started, the tests that need it fail -- they are never skipped. The reason
(and the ``TIDINGS_TEST_POSTGRES_URL`` alternative) is printed with the first such failure only;
the others refer to it in one line.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests import servers


@dataclasses.dataclass
class _Unavailable:
    """Why a flavour's server could not be started (cached: it is tried once per session)."""

    flavour: str
    reason: str
    reported: bool = False

    def fail(self) -> None:
        if not self.reported:
            self.reported = True
            pytest.fail(
                f"cannot start a PostgreSQL server ({self.flavour}) for the tests: {self.reason}\n"
                f"To use a running server instead, set {servers.ENV_URL}=postgresql://user@host:port/db",
                pytrace=False,
            )
        pytest.fail(
            f"no PostgreSQL server ({self.flavour}): see the first failure of this kind for why",
            pytrace=False,
        )


def pytest_report_header() -> str:
    return f"PostgreSQL server flavours: {', '.join(servers.flavours())}"


@pytest.fixture(scope="session")
def _servers() -> Iterator[dict[str, servers.PostgresServer | _Unavailable]]:
    started: dict[str, servers.PostgresServer | _Unavailable] = {}
    try:
        yield started
    finally:
        for server in started.values():
            if not isinstance(server, _Unavailable):
                server.close()


@pytest.fixture(scope="session")
def postgres_flavour() -> str:
    """The server flavour a test runs on (``embedded`` unless parametrized, see above)."""
    return servers.EMBEDDED


@pytest.fixture
def postgres_server(
    _servers: dict[str, servers.PostgresServer | _Unavailable], postgres_flavour: str
) -> servers.PostgresServer:
    """The session's PostgreSQL server of the test's flavour, started on first use."""
    server = _servers.get(postgres_flavour)
    if server is None:
        try:
            server = servers.start_postgres(flavour=postgres_flavour)
        except Exception as exc:
            server = _Unavailable(postgres_flavour, str(exc))
        _servers[postgres_flavour] = server
    if isinstance(server, _Unavailable):
        server.fail()
        raise AssertionError("unreachable")
    return server


@pytest.fixture
def postgres_url(postgres_server: servers.PostgresServer) -> str:
    """A libpq URL of the session's PostgreSQL server."""
    return postgres_server.url


@pytest.fixture
def pg_url(postgres_url: str) -> Iterator[str]:
    """A store URL on a fresh, empty PostgreSQL schema (``?schema=t_<hex>``), dropped after the test."""
    schema = f"t_{uuid.uuid4().hex}"
    yield servers.with_options(postgres_url, schema=schema)
    drop_schema(postgres_url, schema)


def drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(servers.libpq_url(url), autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
