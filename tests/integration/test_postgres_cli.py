"""The CLI against PostgreSQL: migrate, then read what the library wrote."""

from __future__ import annotations

import asyncio
import json

import pytest
from typer.testing import CliRunner

from tidings import open_store
from tidings.cli.main import app
from tidings.testing import Credited

pytestmark = pytest.mark.postgres


def test_db_migrate_then_events(pg_url: str) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["db", "migrate", "--store", pg_url])
    assert first.exit_code == 0 and "applied migrations" in first.output, first.output
    again = runner.invoke(app, ["db", "migrate", "--store", pg_url])
    assert again.exit_code == 0 and "up to date" in again.output

    async def write() -> None:
        async with open_store(pg_url) as store:
            await store.append("acc-1", [Credited(amount=3), Credited(amount=4)])

    asyncio.run(write())
    result = runner.invoke(app, ["events", "--all", "--json", "--store", pg_url])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert [(r["position"], r["data"]["amount"]) for r in rows] == [(1, 3), (2, 4)]


def test_sqlite_migrate_is_a_no_op(tmp_path: object) -> None:
    result = CliRunner().invoke(app, ["db", "migrate", "--store", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 0 and "up to date" in result.output
