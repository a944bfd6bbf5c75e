"""What a run must have achieved, read back from the services' own stores after the run.

:func:`observe` reads each service's store (and the fake mail provider's mailbox) into an
:class:`Observation`; :func:`violations` lists every broken invariant:

* every order reached a terminal state (confirmed / rejected / failed);
* stock is conserved: for every SKU, what was received = what is available + what is reserved, the
  reservations are exactly those of the confirmed orders (none leaked by a compensation), and
  nothing was oversold (available >= 0);
* money captured (less refunds) = the money of the shipped orders = that of the confirmed orders;
* exactly one confirmation e-mail per confirmed order, none for any other;
* in the saga variant, every checkout saga ended.

:func:`disagreements` compares two variants' outcomes for the orders whose outcome the seeded
inputs decide.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from tidings.repository import Repository
from tidings.sagas.queries import list_sagas
from tidings.store.base import EventStore
from tidings.store.tracking import SQLStore, require

from .emails import read_mailbox
from .inventory import StockItem, StockItemReleased, stock_stream
from .orchestration import SAGA_NAME
from .orders import TERMINAL, OrderQueries
from .payments import (
    PaymentCapturedInternally,
    PaymentRefundedInternally,
    PaymentVoidedInternally,
)
from .scenario import Scenario
from .shipping import ShipmentDispatched

__all__ = ["Observation", "disagreements", "observe", "violations"]


@dataclasses.dataclass
class Observation:
    statuses: dict[str, str]
    """order id -> status (from Orders' read model)."""
    reasons: dict[str, str | None]
    amounts: dict[str, int]
    latencies: list[float]
    """Seconds from placed to terminal, of the terminal orders."""
    available: dict[str, int]
    reservations: dict[str, dict[str, int]]
    releases: int
    captured: dict[str, int]
    refunded: dict[str, int]
    voids: int
    shipped: set[str]
    emails: Counter[str]
    sagas: Counter[str]

    def outcome(self, order_id: str) -> str:
        status = self.statuses.get(order_id, "missing")
        if status == "confirmed":
            return "confirmed"
        if status == "rejected":
            return self.reasons.get(order_id) or "rejected"
        return status

    def fingerprint(self) -> tuple[object, ...]:
        """What changes while the system is still working (compared between two reads)."""
        return (
            tuple(sorted(self.statuses.items())),
            tuple(sorted(self.available.items())),
            self.releases,
            tuple(sorted(self.captured.items())),
            tuple(sorted(self.refunded.items())),
            self.voids,
            len(self.shipped),
            sum(self.emails.values()),
            tuple(sorted(self.sagas.items())),
        )

    @property
    def compensations(self) -> int:
        """Compensating actions taken: stock released, authorizations voided, captures refunded."""
        return self.releases + self.voids + len(self.refunded)

    @property
    def terminal(self) -> int:
        return sum(1 for s in self.statuses.values() if s in TERMINAL)


async def observe(
    stores: dict[str, EventStore], scenario: Scenario, mailbox: Path, *, saga: bool
) -> Observation:
    statuses: dict[str, str] = {}
    reasons: dict[str, str | None] = {}
    amounts: dict[str, int] = {}
    latencies: list[float] = []
    for order_id, status, reason, amount, placed_at, decided_at in await OrderQueries(
        stores["orders"]
    ).outcomes():
        statuses[order_id], reasons[order_id], amounts[order_id] = status, reason, amount
        if decided_at is not None and status in TERMINAL:
            latencies.append(decided_at - placed_at)
    items = Repository(stores["inventory"], StockItem)
    available: dict[str, int] = {}
    reservations: dict[str, dict[str, int]] = {}
    releases = 0
    for sku in scenario.stock:
        item = await items.get(stock_stream(sku), create=True)
        available[sku], reservations[sku] = item.available, dict(item.reservations)
    async for _ in stores["inventory"].read_all(event_types=[StockItemReleased.__event_type__]):
        releases += 1
    captured: dict[str, int] = {}
    refunded: dict[str, int] = {}
    voids = 0
    payment_types = [
        cls.__event_type__
        for cls in (PaymentCapturedInternally, PaymentRefundedInternally, PaymentVoidedInternally)
    ]
    async for recorded in stores["payments"].read_all(event_types=payment_types):
        order_id = recorded.stream_id.removeprefix("payment-")
        match recorded.event:
            case PaymentCapturedInternally(amount=amount):
                captured[order_id] = amount
            case PaymentRefundedInternally(amount=amount):
                refunded[order_id] = amount
            case PaymentVoidedInternally():
                voids += 1
    shipped = {
        r.stream_id.removeprefix("shipment-")
        async for r in stores["shipping"].read_all(event_types=[ShipmentDispatched.__event_type__])
    }
    emails: Counter[str] = Counter()
    for mail in read_mailbox(mailbox):
        emails[mail["key"].removeprefix("confirmation-")] += 1
    sagas: Counter[str] = Counter()
    if saga:
        for summary in await list_sagas(
            require(stores["orders"], SQLStore, "the saga invariant"), name=SAGA_NAME, limit=10_000_000
        ):
            sagas[summary.status] += 1
    return Observation(
        statuses,
        reasons,
        amounts,
        latencies,
        available,
        reservations,
        releases,
        captured,
        refunded,
        voids,
        shipped,
        emails,
        sagas,
    )


def violations(seen: Observation, scenario: Scenario) -> list[str]:
    """Every broken invariant, as a sentence (empty: all hold)."""
    out: list[str] = []
    placed = {spec.order_id: spec for spec in scenario.orders}
    not_terminal = sorted(o for o in placed if seen.statuses.get(o) not in TERMINAL)
    if not_terminal:
        out.append(f"{len(not_terminal)} orders are not terminal, e.g. {not_terminal[:3]}")
    confirmed = {o for o, s in seen.statuses.items() if s == "confirmed"}
    for sku, received in scenario.stock.items():
        held = seen.reservations.get(sku, {})
        if seen.available.get(sku, 0) + sum(held.values()) != received:
            out.append(
                f"stock of {sku} not conserved: received {received}, available "
                f"{seen.available.get(sku)}, reserved {sum(held.values())}"
            )
        if seen.available.get(sku, 0) < 0:
            out.append(f"{sku} oversold: available {seen.available.get(sku)}")
        should_hold = {o for o in confirmed if placed[o].sku == sku}
        if set(held) != should_hold:
            leaked = sorted(set(held) - should_hold)
            missing = sorted(should_hold - set(held))
            out.append(f"reservations of {sku}: leaked {leaked[:3]}, missing for confirmed {missing[:3]}")
    kept = sum(seen.captured.values()) - sum(seen.refunded.values())
    shipped_money = sum(seen.amounts.get(o, 0) for o in seen.shipped)
    confirmed_money = sum(seen.amounts.get(o, 0) for o in confirmed)
    if not kept == shipped_money == confirmed_money:
        out.append(
            f"money: captured - refunded = {kept}, shipped orders = {shipped_money}, "
            f"confirmed orders = {confirmed_money}"
        )
    if seen.shipped != confirmed:
        out.append(
            f"shipped but not confirmed: {sorted(seen.shipped - confirmed)[:3]}; "
            f"confirmed but not shipped: {sorted(confirmed - seen.shipped)[:3]}"
        )
    wrong_mail = sorted(o for o in placed if seen.emails.get(o, 0) != (1 if o in confirmed else 0))
    if wrong_mail:
        o = wrong_mail[0]
        out.append(
            f"{len(wrong_mail)} orders without exactly one e-mail per confirmation, e.g. {o}: "
            f"{seen.emails.get(o, 0)} e-mails, status {seen.statuses.get(o)}"
        )
    unfinished = sum(n for status, n in seen.sagas.items() if status in ("running", "compensating"))
    if unfinished:
        out.append(f"{unfinished} checkout sagas have not ended")
    return out


def disagreements(first: Observation, second: Observation, scenario: Scenario) -> tuple[list[str], list[str]]:
    """Orders decided by the seeded inputs whose outcome differs between two runs, and the orders
    left out because a deadline tripped although their payment provider was not slow: a deadline
    measures the whole round trip, so under load it is timing, not the inputs, that decides them."""
    out: list[str] = []
    by_load: list[str] = []
    for spec in scenario.orders:
        if spec.expected is None:
            continue
        a, b = first.outcome(spec.order_id), second.outcome(spec.order_id)
        if "payment_timeout" in (a, b) and spec.expected != "payment_timeout":
            by_load.append(spec.order_id)
        elif a != b:
            out.append(f"{spec.order_id}: {a} vs {b} (inputs say {spec.expected})")
    return out, by_load
