"""Payments: authorizes and captures through an external card processor, voids and refunds.

The card processor is genuinely external, so it is the one fake here (:class:`CardProcessor`): a
card whose token starts with ``decline`` is declined, one starting with ``slow`` answers only after
``slow_latency`` seconds -- longer than the checkout's deadline. Each order's :class:`Payment` is an
aggregate saved through the handler context, so a duplicated delivery finds it already past the
step and does nothing twice.

* **choreography** -- :func:`wire_choreography`: on ``StockReserved`` authorize then capture at
  once; on a decline or on no answer within ``payment_timeout`` publish ``PaymentDeclined`` (reason
  ``declined`` / ``timeout``), which Inventory and Orders compensate by reaction. The deadline is
  Payments' own here.
* **orchestration** -- :func:`wire_orchestration`: one command per step (authorize, capture) and
  per compensation (void, refund). The deadline is the saga's: when the provider takes longer,
  Payments stops waiting (so as not to hold up its bus partition) and does not answer.
"""

from __future__ import annotations

import asyncio

from tidings.aggregate import Aggregate
from tidings.bus.base import Bus
from tidings.events import Event
from tidings.processing.context import HandlerContext
from tidings.service import Service
from tidings.store.base import EventStore

from .contracts import (
    AuthorizePayment,
    CapturePayment,
    PaymentAuthorized,
    PaymentCaptured,
    PaymentDeclined,
    PaymentRefunded,
    PaymentVoided,
    RefundPayment,
    StockReserved,
    VoidPayment,
)
from .wiring import Wiring

__all__ = ["NAME", "CardProcessor", "Payment", "build", "payment_stream"]

NAME = "payments"


class CardProcessor:
    """The external card processor (a fake: it decides by the card token, and is slow on purpose)."""

    def __init__(self, slow_latency: float) -> None:
        self.slow_latency = slow_latency

    async def authorize(self, card: str, amount: int) -> bool:
        if card.startswith("slow"):
            await asyncio.sleep(self.slow_latency)  # the provider's latency, not a synchronisation
        return not card.startswith("decline")


class PaymentAuthorizedInternally(Event):
    __event_type__ = "shop.payments.Authorized"
    amount: int


class PaymentDeclinedInternally(Event):
    __event_type__ = "shop.payments.Declined"
    reason: str


class PaymentCapturedInternally(Event):
    __event_type__ = "shop.payments.Captured"
    amount: int


class PaymentVoidedInternally(Event):
    __event_type__ = "shop.payments.Voided"


class PaymentRefundedInternally(Event):
    __event_type__ = "shop.payments.Refunded"
    amount: int


class Payment(Aggregate):
    """One order's payment: new -> authorized -> captured [-> refunded], or declined / voided."""

    status: str = "new"
    amount: int = 0
    captured: int = 0
    refunded: int = 0
    reason: str | None = None

    def authorize(self, amount: int) -> None:
        if self.status == "new":
            self.record(PaymentAuthorizedInternally(amount=amount))

    def decline(self, reason: str) -> None:
        if self.status == "new":
            self.record(PaymentDeclinedInternally(reason=reason))

    def capture(self) -> bool:
        if self.status == "authorized":
            self.record(PaymentCapturedInternally(amount=self.amount))
        return self.status == "captured"

    def void(self) -> None:
        # Also before the authorization: a late authorization then finds the payment voided.
        if self.status in ("new", "authorized"):
            self.record(PaymentVoidedInternally())

    def refund(self) -> None:
        if self.status == "captured":
            self.record(PaymentRefundedInternally(amount=self.captured))

    def apply(self, event: Event) -> None:
        match event:
            case PaymentAuthorizedInternally(amount=amount):
                self.status, self.amount = "authorized", amount
            case PaymentDeclinedInternally(reason=reason):
                self.status, self.reason = "declined", reason
            case PaymentCapturedInternally(amount=amount):
                self.status, self.captured = "captured", amount
            case PaymentVoidedInternally():
                self.status = "voided"
            case PaymentRefundedInternally(amount=amount):
                self.status, self.refunded = "refunded", amount


def payment_stream(order_id: str) -> str:
    return f"payment-{order_id}"


def build(store: EventStore | str, bus: Bus | str | None, wiring: Wiring) -> Service:
    payments = Service(NAME, store, bus=bus, config=wiring.subscription, ack_wait=wiring.ack_wait)
    payments.publishes(PaymentAuthorized, PaymentCaptured, PaymentDeclined, PaymentVoided, PaymentRefunded)
    processor = CardProcessor(wiring.slow_latency)
    if wiring.variant == "choreography":
        wire_choreography(payments, processor, wiring.payment_timeout)
    else:
        wire_orchestration(payments, processor, wiring.payment_timeout)
    return payments


def wire_choreography(payments: Service, processor: CardProcessor, timeout: float) -> None:
    """Choreography: pay as soon as the stock is reserved; announce the outcome."""

    @payments.handles(StockReserved, group="payments.choreography.pay")
    async def authorize_and_capture_when_stock_reserved(event: StockReserved, ctx: HandlerContext) -> None:
        payment = await ctx.load(Payment, payment_stream(event.order_id), create=True)
        if payment.status != "new":
            return  # paid (or declined) before: a duplicate
        try:
            approved = await asyncio.wait_for(processor.authorize(event.card, event.amount), timeout)
            reason = "declined"
        except TimeoutError:
            approved, reason = False, "timeout"  # the choreography's own deadline
        stream = payment_stream(event.order_id)
        if approved:
            payment.authorize(event.amount)
            payment.capture()
            ctx.save(payment)
            ctx.emit(
                stream,
                [
                    PaymentCaptured(
                        order_id=event.order_id,
                        customer_id=event.customer_id,
                        sku=event.sku,
                        quantity=event.quantity,
                        amount=event.amount,
                    )
                ],
            )
        else:
            payment.decline(reason)
            ctx.save(payment)
            ctx.emit(
                stream,
                [
                    PaymentDeclined(
                        order_id=event.order_id, sku=event.sku, quantity=event.quantity, reason=reason
                    )
                ],
            )


def wire_orchestration(payments: Service, processor: CardProcessor, timeout: float) -> None:
    """Orchestration: one command per step and per compensation, each answered with an event."""

    @payments.handles_command(AuthorizePayment, group="payments.orchestration.authorize")
    async def authorize_on_command(command: AuthorizePayment, ctx: HandlerContext) -> None:
        payment = await ctx.load(Payment, payment_stream(command.order_id), create=True)
        if payment.status == "new":
            try:
                # Waiting longer would only hold up the other payments of this bus partition: the
                # saga's deadline (which started before this call) has passed by then.
                approved = await asyncio.wait_for(processor.authorize(command.card, command.amount), timeout)
            except TimeoutError:
                payment.decline("timeout")
                ctx.save(payment)
                return  # no answer: the saga's deadline decides, and voids
            if approved:
                payment.authorize(command.amount)
            else:
                payment.decline("declined")
            ctx.save(payment)
        # Answer by the payment's state (a redelivered command gets the same answer); a payment
        # voided, or given up on, gets none.
        stream = payment_stream(command.order_id)
        if payment.status == "declined" and payment.reason == "declined":
            ctx.emit(
                stream, [PaymentDeclined(order_id=command.order_id, sku="", quantity=0, reason="declined")]
            )
        elif payment.status == "authorized":
            ctx.emit(stream, [PaymentAuthorized(order_id=command.order_id, amount=payment.amount)])

    @payments.handles_command(CapturePayment, group="payments.orchestration.capture")
    async def capture_on_command(command: CapturePayment, ctx: HandlerContext) -> None:
        payment = await ctx.load(Payment, payment_stream(command.order_id))
        if payment.capture():
            ctx.save(payment)
            ctx.emit(
                payment_stream(command.order_id),
                [
                    PaymentCaptured(
                        order_id=command.order_id,
                        customer_id=command.customer_id,
                        sku=command.sku,
                        quantity=command.quantity,
                        amount=payment.captured,
                    )
                ],
            )

    @payments.handles_command(VoidPayment, group="payments.orchestration.void")
    async def void_on_command(command: VoidPayment, ctx: HandlerContext) -> None:
        payment = await ctx.load(Payment, payment_stream(command.order_id), create=True)
        payment.void()
        ctx.save(payment)
        ctx.emit(payment_stream(command.order_id), [PaymentVoided(order_id=command.order_id)])

    @payments.handles_command(RefundPayment, group="payments.orchestration.refund")
    async def refund_on_command(command: RefundPayment, ctx: HandlerContext) -> None:
        payment = await ctx.load(Payment, payment_stream(command.order_id))
        payment.refund()
        ctx.save(payment)
        ctx.emit(
            payment_stream(command.order_id),
            [PaymentRefunded(order_id=command.order_id, amount=payment.refunded)],
        )
