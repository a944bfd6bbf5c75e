"""``python -m benchmarks [--quick] [SCENARIO ...]``: run, print the table, write the results files."""

from __future__ import annotations

import argparse
import faulthandler
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import footprint, growth, report
from benchmarks.harness import FULL, QUICK, Comparison, Workspace, cpu_probe, log
from benchmarks.quiet import CpuAccount
from benchmarks.scenarios_bus import SCENARIOS as BUS_SCENARIOS
from benchmarks.scenarios_postgres import SCENARIOS as POSTGRES_SCENARIOS
from benchmarks.scenarios_processing import SCENARIOS as PROCESSING_SCENARIOS
from benchmarks.scenarios_shop import SCENARIOS as SHOP_SCENARIOS
from benchmarks.scenarios_sqlite import SCENARIOS as SQLITE_SCENARIOS
from benchmarks.scenarios_sqlite import Context, Scenario

SCENARIOS: dict[str, Scenario] = {
    **SQLITE_SCENARIOS,
    **PROCESSING_SCENARIOS,
    **POSTGRES_SCENARIOS,
    **BUS_SCENARIOS,
    **SHOP_SCENARIOS,
    **growth.scenarios(growth.GrowthConfig()),
    **footprint.SCENARIOS,
}
"""Every scenario by name, in the order ``make bench`` runs them (the growth scenarios are rebuilt
in :func:`main` with the sizes the command line asks for)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark tidings against the eventsourcing library, side by side, on SQLite "
        "and PostgreSQL, and its bus against FastStream and raw nats-py on NATS JetStream.",
        epilog="scenarios: " + ", ".join(f"{s.name} ({s.title})" for s in SCENARIOS.values()),
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help="scenarios to run (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent,
        help="directory for results.json and results.md (default: the benchmarks package)",
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument(
        "--growth-sizes",
        metavar="N,N,...",
        help="numbers of events stored before the growth scenarios measure (default "
        f"0,1000000; 0,200000 with --quick; or ${growth.ENV_SIZES}); the README used 0,1M,10M",
    )
    parser.add_argument("--tmpdir", help="where to create the temporary databases (default: system temp)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.scenarios if name not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    try:
        args.growth = growth.GrowthConfig.choose(args.growth_sizes, quick=args.quick)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    faulthandler.enable()  # a crash in a driver thread should leave a traceback, not just a signal
    sizes = QUICK if args.quick else FULL
    scenarios = {**SCENARIOS, **growth.scenarios(args.growth)}
    names = args.scenarios or list(scenarios)
    workspace = Workspace(args.tmpdir)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load_before is not None and load_before[0] > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load_before[0]:.2f} before the run; other work will skew the figures")
    environment = report.environment()  # before the run: the revision measured, not one written after
    started = datetime.now(UTC)
    clock = time.perf_counter()
    comparisons: list[Comparison] = []
    context = Context(sizes, workspace)
    account = CpuAccount.start(context.server_pids)
    others: float | None = None
    probes: dict[str, tuple[float, float]] = {}
    try:
        for name in names:
            scenario = scenarios[name]
            log(f"{name}: {scenario.title} ...")
            probe = cpu_probe()
            begun = time.perf_counter()
            comparisons.extend(scenario.run(context))
            log(f"{name}: done in {time.perf_counter() - begun:.1f} s")
            probes[name] = (probe, cpu_probe())
        others = None if account is None else account.others()  # while our server still runs
    finally:
        context.postgres.close()
        context.postgres_debian.close()
        context.nats.close()
        workspace.cleanup()
    seconds = time.perf_counter() - clock
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    if others is not None and others > 0.1 * seconds:
        log(
            f"warning: other processes used {others:.0f} CPU-seconds during the {seconds:.0f} s run "
            "(more than 10% of one CPU); they competed with the benchmark for the CPUs"
        )
    run = report.Run(
        mode="quick" if args.quick else "full",
        sizes=sizes,
        comparisons=comparisons,
        started=started,
        seconds=seconds,
        environment=environment,
        load_before=load_before,
        load_after=load_after,
        others_cpu=others,
        cpu_probes=probes,
        kernel_cpu=None if account is None else account.kernel_used,
        postgres={**context.postgres.settings, "source": context.postgres.source}
        if context.postgres.settings
        else None,
    )
    print(report.text_table(run))
    if not args.no_write:
        for path in report.write(run, args.out):
            log(f"wrote {path}")


if __name__ == "__main__":
    main()
