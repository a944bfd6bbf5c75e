"""Fixtures shared by the whole suite.

PostgreSQL: ``postgres_server`` starts one throwaway server per test session (see
:mod:`tests.servers`) the first time a test asks for it, and stops it at the end; ``pg_url`` gives
each test a store URL on a fresh PostgreSQL schema of its own, dropped afterwards. When the server
cannot be started, the tests that need it fail with the reason -- they are never skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests import servers


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[servers.PostgresServer]:
    """The session's PostgreSQL server (``TIDINGS_TEST_POSTGRES_URL``, or a throwaway one)."""
    try:
        server = servers.start_postgres()
    except Exception as exc:
        pytest.fail(f"cannot start a PostgreSQL server for the tests: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
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
