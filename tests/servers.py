"""Throwaway servers for the test suite: :mod:`tidings.testing.servers` (shipped in the wheel, so
that the shop demo's multi-process mode can start a PostgreSQL server too), re-exported here."""

from tidings.testing.servers import (
    ENV_URL,
    SERVER_USER,
    ExternalPostgres,
    PostgresServer,
    ServerError,
    ThrowawayPostgres,
    _free_port,
    libpq_url,
    start_postgres,
    with_options,
)

__all__ = [
    "ENV_URL",
    "SERVER_USER",
    "ExternalPostgres",
    "PostgresServer",
    "ServerError",
    "ThrowawayPostgres",
    "_free_port",
    "libpq_url",
    "start_postgres",
    "with_options",
]
