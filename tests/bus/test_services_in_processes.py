"""Services in separate OS processes (``tidings run``), talking over NATS JetStream: the outbox
relay is SIGKILLed again and again while it publishes, and nothing is lost or applied twice."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import sys
from pathlib import Path

from tests.helpers import wait_until
from tests.nats_servers import NatsServer
from tidings import open_store

APPS = Path(__file__).with_name("apps")
ORDERS = 1500


async def tidings_run(app: str, store: str, bus: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), *sys.path])}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidings.cli",
        "run",
        app,
        "--store",
        store,
        "--bus",
        bus,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while True:  # wait for the banner: the service is running
        line = await asyncio.wait_for(proc.stderr.readline(), 60)
        assert line, "the service exited before it was running"
        if b"running" in line:
            return proc


def reservations(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        try:
            return [r[0] for r in db.execute("SELECT order_id FROM reservations")]
        except sqlite3.OperationalError:
            return []


async def test_relay_sigkilled_while_publishing_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, nats_servers_factory: object
) -> None:
    sys.path.insert(0, str(APPS))
    from relayshop import OrderPlaced

    server: NatsServer = nats_servers_factory.single()  # type: ignore[attr-defined]
    bus = f"{server.url}?prefix=relaykill"
    orders_url = f"sqlite:///{tmp_path}/orders.db"
    inventory_db = tmp_path / "inventory.db"
    async with open_store(orders_url) as store:
        for i in range(0, ORDERS, 50):
            for j in range(i, i + 50):
                await store.append(f"order-{j}", [OrderPlaced(sku=f"sku-{j % 7}", quantity=1 + j % 3)])
        head = await store.head()
        inventory = await tidings_run("relayshop:inventory", f"sqlite:///{inventory_db}", bus)
        try:
            rng = random.Random(11)
            kills_mid_publishing = 0
            for _ in range(5):
                relay = await tidings_run("relayshop:orders", orders_url, bus)
                await asyncio.sleep(rng.uniform(0.05, 0.3))  # the fault's timing is the scenario
                relay.send_signal(signal.SIGKILL)
                assert await relay.wait() == -signal.SIGKILL
                checkpoint = (await store.checkpoints()).get("orders.relay", 0)
                kills_mid_publishing += 0 < checkpoint < head or checkpoint == 0
            # The kills really hit the relay while it had work to publish.
            assert kills_mid_publishing >= 2
            relay = await tidings_run("relayshop:orders", orders_url, bus)
            assert await store.wait_for(head, group="orders.relay", timeout=120)
            await wait_until(
                lambda: len(reservations(inventory_db)) >= ORDERS,
                60,
                lambda: f"{ORDERS} reservations (have {len(reservations(inventory_db))})",
            )
            relay.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(relay.wait(), 60) == 0
        finally:
            inventory.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(inventory.wait(), 60) == 0
    done = reservations(inventory_db)
    assert len(done) == ORDERS, "an order was lost or reserved twice"
    assert set(done) == {f"order-{j}" for j in range(ORDERS)}


def test_bus_setup_command_creates_then_finds_the_streams(nats_url: str) -> None:
    from typer.testing import CliRunner

    from tidings.cli.main import app

    runner = CliRunner()
    first = runner.invoke(app, ["bus", "setup", "orders", "billing", "--bus", nats_url])
    assert first.exit_code == 0, first.output
    assert first.output.count("created stream") == 2
    again = runner.invoke(app, ["bus", "setup", "orders", "--bus", nats_url])
    assert again.exit_code == 0 and "unchanged stream" in again.output, again.output
    memory = runner.invoke(app, ["bus", "setup", "orders", "--bus", "memory://"])
    assert memory.exit_code == 0 and "nothing to set up" in memory.output
    missing = runner.invoke(app, ["bus", "setup", "orders"], env={"TIDINGS_BUS": ""})
    assert missing.exit_code == 2
