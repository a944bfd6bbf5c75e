"""Email: sends the order confirmation.

**Event notification**: Email receives a thin ``OrderConfirmed {order_id}`` and asks Orders' query
API for the details (:class:`OrderDetailsSource`: a function call when the services share a process,
HTTP when they do not -- :class:`~.orders_api.HttpOrderDetails`).

The mail provider is genuinely external, so it is the one fake here (:class:`MailProvider`, which
writes each message as a line of a file). Like real providers it takes an idempotency key: a
delivery handled twice (the process died after sending, before its inbox row committed) sends
one e-mail. Duplicated deliveries are absorbed before that by the service's inbox.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Protocol

import orjson

from tidings.bus.base import Bus
from tidings.errors import TidingsError
from tidings.events import Event
from tidings.processing.context import HandlerContext
from tidings.service import Service
from tidings.store.base import EventStore

from .contracts import OrderConfirmed
from .orders import OrderDetails
from .wiring import Wiring

__all__ = ["NAME", "MailProvider", "OrderDetailsSource", "OrdersUnavailable", "build", "read_mailbox"]

NAME = "email"


class OrdersUnavailable(TidingsError):
    """Orders' query API did not answer (or does not know the order yet): try again later."""

    transient = True


class OrderDetailsSource(Protocol):
    async def details(self, order_id: str) -> OrderDetails | None: ...


class MailProvider:
    """The external mail provider (a fake): one JSON line per e-mail sent, in ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sent_keys: set[str] = {entry["key"] for entry in read_mailbox(path)}
        self.refused = 0

    async def send(self, key: str, to: str, subject: str, body: str) -> bool:
        """Send once per idempotency ``key``; False if that key was sent before."""
        if key in self.sent_keys:
            self.refused += 1
            return False
        line = orjson.dumps({"key": key, "to": to, "subject": subject, "body": body}) + b"\n"
        await asyncio.to_thread(_append, self.path, line)
        self.sent_keys.add(key)
        return True


def _append(path: Path, line: bytes) -> None:
    with path.open("ab") as file:
        file.write(line)


def read_mailbox(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


class ConfirmationEmailSent(Event):
    __event_type__ = "shop.email.ConfirmationEmailSent"
    order_id: str
    to: str


def build(
    store: EventStore | str,
    bus: Bus | str | None,
    wiring: Wiring,
    *,
    orders: OrderDetailsSource,
    mail: MailProvider,
) -> Service:
    email = Service(NAME, store, bus=bus, config=wiring.subscription, ack_wait=wiring.ack_wait)
    wire_event_notification(email, orders, mail)
    return email


def wire_event_notification(email: Service, orders: OrderDetailsSource, mail: MailProvider) -> None:
    """Event notification: the event says *that* an order was confirmed; Orders says *what*."""

    @email.handles(OrderConfirmed, group="email.confirmation")
    async def send_confirmation_when_order_confirmed(event: OrderConfirmed, ctx: HandlerContext) -> None:
        details = await orders.details(event.order_id)
        if details is None or details.status != "confirmed":
            raise OrdersUnavailable(f"Orders does not show {event.order_id!r} as confirmed yet")
        body = (
            f"Dear {details.customer_name},\n{details.quantity} x {details.sku} are on their way. "
            f"We charged {details.amount}."
        )
        await mail.send(
            f"confirmation-{event.order_id}",
            details.customer_email,
            f"Order {event.order_id} confirmed",
            body,
        )
        ctx.emit(
            f"email-{event.order_id}",
            [ConfirmationEmailSent(order_id=event.order_id, to=details.customer_email)],
        )
