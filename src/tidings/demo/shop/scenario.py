"""The seeded inputs of a run: customers, stock, and orders with their injected failures.

Everything that decides an order's fate comes from here, drawn from ``random.Random(seed)``: a
card that declines, a card whose provider is slow (it trips the deadline), an item that is sold
out. Orders of the one *limited* SKU compete for too little stock, so which of them win depends
on arrival order: those are the only orders whose outcome the inputs do not decide.
"""

from __future__ import annotations

import dataclasses
import random

from .customers import Address

__all__ = ["LIMITED_SKU", "RETIRED_SKU", "OrderSpec", "Scenario", "make_scenario"]

RETIRED_SKU = "sku-retired"
"""Sold out for good: no stock at all."""
LIMITED_SKU = "sku-limited"
"""Stock for about half of the orders that want it: a race, and the no-oversell check."""

_CITIES = ("Lyon", "Porto", "Gent", "Turku", "Bergen", "Graz", "Split", "Cork", "Brno", "Pisa")
_STREETS = ("Station Road", "Mill Lane", "Church Street", "High Street", "Park Avenue", "Quay Side")


@dataclasses.dataclass(frozen=True)
class OrderSpec:
    """One order to place. ``expected`` is the outcome its inputs decide (None: a stock race)."""

    order_id: str
    customer_id: str
    sku: str
    quantity: int
    unit_price: int
    card: str
    expected: str | None

    @property
    def amount(self) -> int:
        return self.quantity * self.unit_price


@dataclasses.dataclass(frozen=True)
class Scenario:
    customers: dict[str, list[Address]]
    """Each customer's addresses in the order they were set (the last one is current)."""
    emails: dict[str, str]
    stock: dict[str, int]
    orders: list[OrderSpec]


def make_scenario(
    orders: int,
    *,
    seed: int,
    out_of_stock_rate: float,
    decline_rate: float,
    slow_payment_rate: float,
    limited_rate: float = 0.03,
    skus: int = 20,
) -> Scenario:
    rng = random.Random(seed)
    n_customers = max(5, orders // 10)
    customers: dict[str, list[Address]] = {}
    emails: dict[str, str] = {}
    for i in range(1, n_customers + 1):
        customer_id = f"customer-{i:05d}"
        name = f"Customer {i}"
        moves = 2 if rng.random() < 0.1 else 1  # some moved once: the replica must keep the newest
        customers[customer_id] = [
            Address(
                name,
                f"{rng.randint(1, 200)} {rng.choice(_STREETS)}",
                rng.choice(_CITIES),
                f"{rng.randint(1000, 99999)}",
                "EU",
            )
            for _ in range(moves)
        ]
        emails[customer_id] = f"customer{i}@example.com"
    catalogue = [f"sku-{i:02d}" for i in range(1, skus + 1)]
    specs: list[OrderSpec] = []
    for i in range(1, orders + 1):
        draw = rng.random()
        if draw < out_of_stock_rate:
            sku = RETIRED_SKU
        elif draw < out_of_stock_rate + limited_rate:
            sku = LIMITED_SKU
        else:
            sku = rng.choice(catalogue)
        pay = rng.random()
        if pay < decline_rate:
            card, outcome = f"decline-{i}", "payment_declined"
        elif pay < decline_rate + slow_payment_rate:
            card, outcome = f"slow-{i}", "payment_timeout"
        else:
            card, outcome = f"ok-{i}", "confirmed"
        expected: str | None = outcome
        if sku == RETIRED_SKU:
            expected = "out_of_stock"
        elif sku == LIMITED_SKU:
            expected = None
        specs.append(
            OrderSpec(
                order_id=f"order-{i:06d}",
                customer_id=f"customer-{rng.randint(1, n_customers):05d}",
                sku=sku,
                quantity=rng.randint(1, 3),
                unit_price=rng.randint(5, 120),
                card=card,
                expected=expected,
            )
        )
    demand: dict[str, int] = {}
    for spec in specs:
        demand[spec.sku] = demand.get(spec.sku, 0) + spec.quantity
    stock = {sku: demand.get(sku, 0) + 5 for sku in catalogue}
    stock[LIMITED_SKU] = max(1, demand.get(LIMITED_SKU, 0) // 2)
    return Scenario(customers=customers, emails=emails, stock=stock, orders=specs)
