"""The bus, growth and footprint benchmark scenarios still run (at a tiny size), so that they
cannot rot between runs of ``make bench``. Nothing here looks at a figure's size: timings are for
``benchmarks/``, never for tests."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from benchmarks import footprint, growth, nats_server
from benchmarks.harness import QUICK, Workspace
from benchmarks.scenarios_bus import SCENARIOS
from benchmarks.scenarios_sqlite import Context

from tests.nats_servers import ENV_URL as TEST_NATS_URL

TINY = dataclasses.replace(QUICK, bus_events=40, bus_latency_events=20, bus_scale_events=40, bus_repeats=1)


@pytest.mark.timeout(240)
def test_bus_scenarios_run_at_a_tiny_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.environ.get(TEST_NATS_URL):  # the suite's server, if it is given one; else a throwaway one
        monkeypatch.setenv(nats_server.ENV_URL, os.environ[TEST_NATS_URL])
    context = Context(TINY, Workspace(str(tmp_path)))
    try:
        rows = [row for scenario in SCENARIOS.values() for row in scenario.run(context)]
    finally:
        context.nats.close()
        context.workspace.cleanup()
    assert {row.scenario for row in rows} == set(SCENARIOS)
    for row in rows:
        assert row.value > 0 and row.reference_value > 0, row
        assert len(row.samples) == len(row.reference_samples) == 1, row


TINY_GROWTH = growth.GrowthConfig(
    sizes=(0, 3_000),
    sequential_saves=4,
    bulk_events=50,
    aggregate_events=20,
    window=200,
    fill_append=500,
    repeats=2,
)


@pytest.mark.timeout(300)
def test_growth_scenarios_run_at_a_tiny_size(tmp_path: Path) -> None:
    context = Context(QUICK, Workspace(str(tmp_path)))
    try:
        scenarios = growth.scenarios(TINY_GROWTH)
        rows = [row for scenario in scenarios.values() for row in scenario.run(context)]
    finally:
        context.postgres.close()
        context.workspace.cleanup()
    assert {row.scenario for row in rows} == {"growth_sqlite", "growth_pg"}
    for name, per_measurement in (("growth_sqlite", 2), ("growth_pg", 1)):
        units = [row.unit for row in rows if row.scenario == name]
        # Five measurements against the empty store beside it (events/s, and on SQLite CPU time
        # per event too), and the space per million events.
        assert len(units) == 5 * per_measurement + 1, units
        assert all("3k stored" in unit for unit in units), units
    for row in rows:
        assert row.value > 0 and row.reference_value > 0, row
        if row.unit.startswith(("events/s", "CPU")):
            assert len(row.samples) == len(row.reference_samples) == TINY_GROWTH.repeats, row
        else:  # the space taken: a stored event costs more than its payload (ids, indexes)
            assert row.value > row.reference_value, row


def test_growth_sizes_are_parsed_and_bad_ones_refused() -> None:
    assert growth.parse_sizes("0,1M,10000000") == (0, 1_000_000, 10_000_000)
    assert growth.parse_sizes("200k, 0") == (0, 200_000)
    assert growth.GrowthConfig.choose("0,5k", quick=False).sizes == (0, 5_000)
    assert growth.GrowthConfig.choose(None, quick=True).sizes == (0, 200_000)
    for bad in ("", "ten", "-5", "1,,x"):
        with pytest.raises(ValueError, match="growth size"):
            growth.parse_sizes(bad)


@pytest.mark.timeout(300)
def test_footprint_scenario_runs_at_a_tiny_size(tmp_path: Path) -> None:
    context = Context(dataclasses.replace(QUICK, memory_events=5_000), Workspace(str(tmp_path)))
    try:
        rows = footprint.memory(context, 5_000) + footprint.idle(context, 4, 0.5)
    finally:
        context.workspace.cleanup()
    units = [row.unit for row in rows]
    for what in ("read_all", "catch-up", "rebuild"):
        assert f"MiB peak Python heap, {what}" in units
    assert units[-1] == "% of one core, idle service"
    for row in rows:
        # RSS is sampled, and over a few hundred events it may not have grown at all.
        assert row.value >= 0 and row.reference_value >= 0, row
    heaps = [row for row in rows if "heap" in row.unit]
    assert all(row.value > 0 and row.reference_value > 0 for row in heaps), heaps
