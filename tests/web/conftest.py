"""Fixtures of the console's tests: a seeded store (the system of :mod:`tests.web.world`) on
SQLite and on PostgreSQL, an httpx client on the application, and a live uvicorn server.

``seeded_url`` is parametrized over both SQL backends (PostgreSQL marked ``postgres``); the
browser and schema tests use SQLite only (``sqlite_seeded``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest

from tests.web.live import LiveServer, run_async
from tests.web.world import Seeded, seed
from tidings import EventStore, open_store
from tidings.service import Service
from tidings.web import create_app

TOKEN = "s3cret-token"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def seeded_url(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Seeded]:
    """A store URL of the test's backend, seeded with the test system (see tests/web/world.py)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/console.db"
    else:
        url = request.getfixturevalue("pg_url")
    return url, run_async(seed(url))


@pytest.fixture
def sqlite_seeded(tmp_path: Path) -> tuple[str, Seeded]:
    url = f"sqlite:///{tmp_path}/console.db"
    return url, run_async(seed(url))


Client = Callable[..., AbstractAsyncContextManager[tuple[httpx.AsyncClient, EventStore]]]


@pytest.fixture
def client(seeded_url: tuple[str, Seeded]) -> Client:
    """``async with client(token=..., service=...) as (http, store)``: the console on the seeded
    store (opened here, in the test's loop), and the store to check what changed."""

    @asynccontextmanager
    async def make(
        *, token: str | None = TOKEN, service: Callable[[EventStore], Service] | None = None
    ) -> AsyncIterator[tuple[httpx.AsyncClient, EventStore]]:
        async with open_store(seeded_url[0]) as store:
            app = create_app(store, token=token, service=None if service is None else service(store))
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://console") as http:
                yield http, store

    return make


@pytest.fixture
def live(sqlite_seeded: tuple[str, Seeded]) -> Iterator[LiveServer]:
    """``tidings serve``'s application on the seeded SQLite store, in uvicorn on a free port,
    with the token and the billing service (so that dead letters can be retried)."""
    from tests.web.world import Switch, billing_service

    switch = Switch()
    url = sqlite_seeded[0]
    store = open_store(url)
    app = create_app(store, token=TOKEN, service=billing_service(store, switch))
    with LiveServer(app) as server:
        server.switch = switch
        server.seeded = sqlite_seeded[1]
        server.store_url = url
        yield server
