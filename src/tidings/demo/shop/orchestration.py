"""Orchestration: the checkout as a saga that runs in Orders and directs the other services.

reserve stock -> authorize payment -> capture payment -> ship, each step a command to the one
service that owns it, each reply an integration event. When a step fails the saga compensates the
steps done, in reverse order: a refund for a capture, a void for an authorization, a release for a
reservation. The authorization has a deadline (``payment_timeout``): a slow payment provider trips
it, the saga voids the authorization (which may yet succeed) and releases the stock.

Compare with the choreography (the ``*_when_*`` handlers of each service): there no one directs,
each service reacts to the previous one's event, and a failure flows back as an event that the
others compensate by reaction (``PaymentDeclined`` -> Inventory releases the stock). The timeout
of the choreography is Payments' own: it gives the provider ``payment_timeout`` and declines with
reason ``timeout`` when it is up -- so both variants end an order with a slow provider the same way,
but in the choreography the deadline is a local decision of one service, not a durable timer
that survives the orchestrator's restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tidings.events import Event
from tidings.sagas.definition import Saga, Step

from .contracts import (
    AuthorizePayment,
    CapturePayment,
    OrderShipped,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    RefundPayment,
    ReleaseStock,
    ReserveStock,
    ShipOrder,
    StockReleased,
    StockReserved,
    StockUnavailable,
    VoidPayment,
)

__all__ = ["SAGA_NAME", "SAGA_PREFIX", "checkout_saga", "outcome_of_saga"]

SAGA_NAME = "checkout"
SAGA_PREFIX = f"saga-{SAGA_NAME}-"


def checkout_saga(started_by: type[Event], payment_timeout: float) -> Saga:
    """The checkout saga, started by Orders' own ``started_by`` event (which has the fields of
    :class:`~.contracts.ReserveStock`), with the authorization's deadline ``payment_timeout`` s."""

    class Checkout(Saga):
        name = SAGA_NAME
        steps = (
            Step(
                "reserve",
                to="inventory",
                command=lambda d: ReserveStock(**{k: d[k] for k in ReserveStock.model_fields}),
                success=StockReserved,
                failure=StockUnavailable,
                compensation=lambda d: ReleaseStock(order_id=d["order_id"], sku=d["sku"]),
                compensated_by=StockReleased,
            ),
            Step(
                "authorize",
                to="payments",
                command=lambda d: AuthorizePayment(
                    order_id=d["order_id"], amount=d["amount"], card=d["card"]
                ),
                success=PaymentAuthorized,
                failure=PaymentDeclined,
                # A void is fire-and-forget: Payments voids a late authorization when it comes.
                compensation=lambda d: VoidPayment(order_id=d["order_id"]),
                timeout=payment_timeout,
            ),
            Step(
                "capture",
                to="payments",
                command=lambda d: CapturePayment(**{k: d[k] for k in CapturePayment.model_fields}),
                success=PaymentCaptured,
                compensation=lambda d: RefundPayment(order_id=d["order_id"]),
                compensated_by=PaymentRefunded,
            ),
            Step(
                "ship",
                to="shipping",
                command=lambda d: ShipOrder(order_id=d["order_id"], customer_id=d["customer_id"]),
                success=OrderShipped,
            ),
        )

        def start(self, event: Event) -> tuple[str, Mapping[str, Any]]:
            data = event.model_dump()
            return str(data["order_id"]), {k: data[k] for k in ReserveStock.model_fields}

    Checkout.started_by = started_by
    return Checkout()


def outcome_of_saga(reason: str) -> str:
    """The order's outcome category for a compensated checkout's reason."""
    if reason.startswith("reserve: StockUnavailable"):
        return "out_of_stock"
    if reason.startswith("authorize: PaymentDeclined"):
        return "payment_declined"
    if reason.startswith("authorize timed out"):
        return "payment_timeout"
    return "compensated"
