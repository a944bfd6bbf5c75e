"""The processing commands: run, dlq, projections, groups — through the CLI runner and a process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tidings import open_store
from tidings.cli.main import app

APP = textwrap.dedent(
    """
    from tidings import Event, Projection, ProjectionTx, RetryPolicy, Service, SubscriptionConfig

    class Paid(Event):
        __event_type__ = "cliapp.Paid"
        amount: int

    class Revenue(Projection):
        name = "revenue"
        tables = {"revenue": "CREATE TABLE {revenue} (k TEXT PRIMARY KEY, total INTEGER)"}

        def paid(self, event: Paid, tx: ProjectionTx) -> None:
            tx.execute(
                "INSERT INTO {revenue} VALUES ('all', ?) ON CONFLICT (k) "
                "DO UPDATE SET total = {revenue}.total + excluded.total",
                (event.amount,),
            )

    FAILING = {13}
    service = Service("billing", config=SubscriptionConfig(
        poll_interval=0.05, retry=RetryPolicy(max_attempts=2, initial_delay=0.001)))
    service.add_projection(Revenue())

    @service.handles(Paid)
    async def notify(event: Paid) -> None:
        if event.amount in FAILING:
            raise RuntimeError(f"cannot notify about {event.amount}")
    """
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "cliapp.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("cliapp", None)
    return tmp_path


def test_run_dlq_and_projections_end_to_end(workdir: Path) -> None:
    url = f"sqlite:///{workdir}/app.db"
    import cliapp  # type: ignore[import-not-found]

    async def seed() -> None:
        async with open_store(url) as store:
            for amount in [5, 13, 7]:
                await store.append("pay-1", [cliapp.Paid(amount=amount)])

    asyncio.run(seed())

    # `tidings run` as a real process; SIGTERM stops it gracefully with exit 0.
    env = {**os.environ, "TIDINGS_STORE": url, "PYTHONPATH": str(workdir)}

    async def run_service() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tidings.cli",
            "run",
            "cliapp:service",
            "--store",
            url,
            cwd=workdir,
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        async with open_store(url) as store:
            for group in ("billing.notify", "projection:revenue:g1"):
                assert await store.wait_for(3, group=group, timeout=30), group
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0

    asyncio.run(run_service())
    runner = CliRunner()

    result = runner.invoke(app, ["dlq", "list", "--json", "--store", url])
    assert result.exit_code == 0, result.output
    [dead] = [json.loads(line) for line in result.output.splitlines()]
    assert dead["group"] == "billing.notify" and "cannot notify about 13" in dead["error"]
    assert dead["position"] == 2 and dead["attempts"] == 2

    shown = runner.invoke(app, ["dlq", "show", str(dead["id"]), "--store", url])
    assert shown.exit_code == 0 and "RuntimeError" in shown.output

    failed = runner.invoke(app, ["dlq", "retry", str(dead["id"]), "--app", "cliapp:service", "--store", url])
    assert failed.exit_code == 1 and "failed again" in failed.output

    cliapp.FAILING.clear()  # the bug is fixed
    listed = runner.invoke(app, ["dlq", "list", "--json", "--store", url])
    [again] = [json.loads(line) for line in listed.output.splitlines()]
    retried = runner.invoke(
        app, ["dlq", "retry", str(again["id"]), "--app", "cliapp:service", "--store", url]
    )
    assert retried.exit_code == 0, retried.output
    assert runner.invoke(app, ["dlq", "list", "--json", "--store", url]).output == ""

    status = runner.invoke(app, ["projections", "status", "--json", "--store", url])
    [proj] = [json.loads(line) for line in status.output.splitlines()]
    assert (proj["name"], proj["generation"], proj["lag"]) == ("revenue", 1, 0)

    rebuilt = runner.invoke(
        app, ["projections", "rebuild", "revenue", "--app", "cliapp:service", "--store", url]
    )
    assert rebuilt.exit_code == 0, rebuilt.output
    status = runner.invoke(app, ["projections", "status", "--json", "--store", url])
    assert json.loads(status.output)["generation"] == 2

    async def total() -> list[tuple[object, ...]]:
        async with open_store(url) as store:
            return await store.query("SELECT total FROM revenue")

    assert asyncio.run(total()) == [(25,)]

    groups = runner.invoke(app, ["groups", "--json", "--store", url])
    names = {json.loads(line)["group"] for line in groups.output.splitlines()}
    assert names == {"billing.notify", "projection:revenue:g2"}


def test_bad_invocations(workdir: Path) -> None:
    url = f"sqlite:///{workdir}/bad.db"
    runner = CliRunner()
    for spec, message in [
        ("nocolon", "module:attribute"),
        ("nosuchmod:app", "no module named 'nosuchmod'"),
        ("cliapp:missing", "no attribute"),
        ("cliapp:FAILING", "is a builtins.set; expected a tidings.Service"),
    ]:
        result = runner.invoke(app, ["run", spec, "--store", url])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (workdir / "bad.db").exists()
    result = runner.invoke(app, ["dlq", "discard", "99", "--store", url])
    assert result.exit_code == 1 and "does not exist" in result.output
    asyncio.run(_touch(url))
    result = runner.invoke(app, ["dlq", "discard", "99", "--store", url])
    assert result.exit_code == 1 and "no dead letter with id 99" in result.output
    result = runner.invoke(app, ["projections", "rebuild", "nope", "--app", "cliapp:service", "--store", url])
    assert result.exit_code == 2 and "no projection 'nope'" in result.output


async def _touch(url: str) -> None:
    async with open_store(url):
        pass
