"""The bus benchmark scenarios still run (at a tiny size), so that they cannot rot between runs of
``make bench``. Nothing here looks at a figure: timings are for ``benchmarks/``, never for tests."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from benchmarks import nats_server
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
