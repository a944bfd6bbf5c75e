"""``tidings run --metrics-port``: a real process serving /metrics, scraped over HTTP; the bad
invocations, and the command without the ``metrics`` extra."""

from __future__ import annotations

import asyncio
import http.client
import os
import signal
import socket
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from tests.helpers import wait_until
from tidings import open_store
from tidings.cli.main import app
from tidings.testing.servers import free_port

APP = textwrap.dedent(
    """
    from tidings import Event, RetryPolicy, Service, SubscriptionConfig

    class Paid(Event):
        __event_type__ = "metricsapp.Paid"
        amount: int

    service = Service("billing", config=SubscriptionConfig(
        poll_interval=0.05, retry=RetryPolicy(max_attempts=2, initial_delay=0.001)))

    @service.handles(Paid)
    async def notify(event: Paid) -> None:
        if event.amount == 13:
            raise RuntimeError("cannot notify about 13")
    """
)

# Runs the CLI as if prometheus_client were not installed: its import fails, as it would.
WITHOUT_EXTRA = (
    "import sys; sys.modules['prometheus_client'] = None; from tidings.cli.main import main; main()"
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "metricsapp.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("metricsapp", None)
    return tmp_path


def fetch(port: int) -> str | None:
    """The page at /metrics, or None while nothing listens."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        return body
    except ConnectionRefusedError:
        return None
    finally:
        connection.close()


def values(text: str) -> dict[tuple[str, str], float]:
    """Samples of the ``billing.notify`` group and of the service, by (name, group or "")."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("service") == "billing" and "state" not in sample.labels:
                out[(sample.name, sample.labels.get("group", ""))] = sample.value
    return out


async def start(
    workdir: Path, url: str, *args: str, python: tuple[str, ...] = ("-m", "tidings.cli")
) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    env.pop("TIDINGS_METRICS_PORT", None)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *python,
        "run",
        "metricsapp:service",
        "--store",
        url,
        *args,
        cwd=workdir,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )


def test_run_serves_metrics_while_it_runs(workdir: Path) -> None:
    url = f"sqlite:///{workdir}/app.db"
    port = free_port()
    import metricsapp  # type: ignore[import-not-found]

    async def scenario() -> None:
        proc = await start(workdir, url, "--metrics-port", str(port))
        try:
            page = await wait_until(lambda: asyncio.to_thread(fetch, port), 60, "the metrics endpoint")
            assert values(page)[("tidings_group_handled_total", "billing.notify")] == 0
            async with open_store(url) as store:
                for amount in (5, 13, 7):
                    await store.append("pay-1", [metricsapp.Paid(amount=amount)])
                assert await store.wait_for(3, group="billing.notify", timeout=30)

            async def settled() -> dict[tuple[str, str], float] | None:
                found = values(await asyncio.to_thread(fetch, port) or "")
                return found if found.get(("tidings_group_handled_total", "billing.notify")) == 2 else None

            found = await wait_until(settled, 30, "two events handled")
            assert found[("tidings_group_lag", "billing.notify")] == 0
            assert found[("tidings_group_retries_total", "billing.notify")] == 1
            assert found[("tidings_group_dead_lettered_total", "billing.notify")] == 1
            assert found[("tidings_group_dead_letters", "billing.notify")] == 1
            assert found[("tidings_group_alive", "billing.notify")] == 1
            assert found[("tidings_head_position", "")] == 3
            # Appended by the test's own process, not the service's: its counter says so.
            assert found[("tidings_appended_events_total", "")] == 0
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(proc.wait(), 30)
        assert proc.stderr is not None
        stderr = (await proc.stderr.read()).decode()
        assert code == 0, stderr
        assert f"metrics at http://127.0.0.1:{port}/metrics" in stderr
        assert await asyncio.to_thread(fetch, port) is None  # stopped with the service

    asyncio.run(scenario())


def test_without_the_extra_metrics_fail_with_the_fix_and_run_still_works(workdir: Path) -> None:
    url = f"sqlite:///{workdir}/plain.db"
    python = ("-c", WITHOUT_EXTRA)

    async def scenario() -> None:
        refused = await start(workdir, url, "--metrics-port", str(free_port()), python=python)
        assert await asyncio.wait_for(refused.wait(), 60) == 1
        assert refused.stderr is not None
        message = (await refused.stderr.read()).decode()
        assert "pip install 'tidings[metrics]'" in message, message
        assert not (workdir / "plain.db").exists()  # refused before the store was opened

        # Without --metrics-port nothing needs the extra.
        plain = await start(workdir, url, python=python)
        try:
            async with open_store(url) as store:
                await store.append("pay-1", [__import__("metricsapp").Paid(amount=1)])
                assert await store.wait_for(1, group="billing.notify", timeout=60)
        finally:
            plain.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(plain.wait(), 30) == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics-port", "70000"], "metrics port must be an int in 0..65535, got 70000"),
        (["--metrics-port", "-1"], "metrics port must be an int in 0..65535, got -1"),
        (["--metrics-port", "0"], "--metrics-port must be a port in 1..65535"),
        (["--metrics-host", "0.0.0.0"], "--metrics-host needs --metrics-port"),
        (["--metrics-port", "9464", "--metrics-host", " "], "metrics host must be a non-empty str"),
    ],
)
def test_bad_metrics_options_exit_2_and_start_nothing(workdir: Path, args: list[str], message: str) -> None:
    url = f"sqlite:///{workdir}/bad.db"
    result = CliRunner().invoke(app, ["run", "metricsapp:service", "--store", url, *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (workdir / "bad.db").exists()


def test_a_port_in_use_exits_1_and_starts_nothing(workdir: Path) -> None:
    url = f"sqlite:///{workdir}/busy.db"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            app, ["run", "metricsapp:service", "--store", url, "--metrics-port", str(port)]
        )
    assert result.exit_code == 1, result.output
    assert f"cannot serve metrics on 127.0.0.1:{port}" in " ".join(result.output.split())

    async def checkpoints() -> dict[str, int]:
        async with open_store(url) as store:
            return await store.checkpoints()

    assert asyncio.run(checkpoints()) == {}
