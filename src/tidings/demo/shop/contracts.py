"""The shop's public contracts: the integration events and commands that cross service boundaries.

Everything here is what one service may rely on from another. Each integration event names the
service that publishes it (``__source__``); each command is addressed to one owner service.
Domain events -- a service's private record of what happened, free to change -- live in the
service's own module (``OrderPlaced`` in :mod:`.orders`, ``StockItemReserved`` in :mod:`.inventory`...).
"""

from __future__ import annotations

from tidings.commands import Command
from tidings.integration import IntegrationEvent

__all__ = [
    "AuthorizePayment",
    "CapturePayment",
    "CustomerAddressChanged",
    "OrderConfirmed",
    "OrderRejected",
    "OrderShipped",
    "OrderSubmitted",
    "PaymentAuthorized",
    "PaymentCaptured",
    "PaymentDeclined",
    "PaymentRefunded",
    "PaymentVoided",
    "RefundPayment",
    "ReleaseStock",
    "ReserveStock",
    "ShipOrder",
    "StockReleased",
    "StockReserved",
    "StockUnavailable",
    "VoidPayment",
]

# -- Orders ------------------------------------------------------------------------------------------


class OrderSubmitted(IntegrationEvent):
    """An order was placed (the public face of the internal ``OrderPlaced``)."""

    __source__ = "orders"
    __event_type__ = "shop.OrderSubmitted"
    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount: int
    card: str


class OrderConfirmed(IntegrationEvent):
    """Event notification: deliberately thin. Whoever needs the details asks Orders' query API."""

    __source__ = "orders"
    __event_type__ = "shop.OrderConfirmed"
    order_id: str


class OrderRejected(IntegrationEvent):
    __source__ = "orders"
    __event_type__ = "shop.OrderRejected"
    order_id: str
    reason: str


# -- Customers ---------------------------------------------------------------------------------------


class CustomerAddressChanged(IntegrationEvent):
    """Event-carried state transfer: the *whole* address, so consumers keep a replica and never call
    Customers. ``revision`` orders the changes of one customer (a replica keeps the newest)."""

    __source__ = "customers"
    __event_type__ = "shop.CustomerAddressChanged"
    customer_id: str
    revision: int
    name: str
    street: str
    city: str
    postcode: str
    country: str


# -- Inventory ---------------------------------------------------------------------------------------


class StockReserved(IntegrationEvent):
    """Carries what the next steps of the choreography need (amount, card, customer)."""

    __source__ = "inventory"
    __event_type__ = "shop.StockReserved"
    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount: int
    card: str


class StockUnavailable(IntegrationEvent):
    __source__ = "inventory"
    __event_type__ = "shop.StockUnavailable"
    order_id: str
    sku: str
    requested: int
    available: int


class StockReleased(IntegrationEvent):
    __source__ = "inventory"
    __event_type__ = "shop.StockReleased"
    order_id: str
    sku: str
    quantity: int


# -- Payments ----------------------------------------------------------------------------------------


class PaymentAuthorized(IntegrationEvent):
    __source__ = "payments"
    __event_type__ = "shop.PaymentAuthorized"
    order_id: str
    amount: int


class PaymentCaptured(IntegrationEvent):
    __source__ = "payments"
    __event_type__ = "shop.PaymentCaptured"
    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount: int


class PaymentDeclined(IntegrationEvent):
    """``reason`` is ``declined`` (the card) or ``timeout`` (the provider did not answer in time)."""

    __source__ = "payments"
    __event_type__ = "shop.PaymentDeclined"
    order_id: str
    sku: str
    quantity: int
    reason: str


class PaymentVoided(IntegrationEvent):
    __source__ = "payments"
    __event_type__ = "shop.PaymentVoided"
    order_id: str


class PaymentRefunded(IntegrationEvent):
    __source__ = "payments"
    __event_type__ = "shop.PaymentRefunded"
    order_id: str
    amount: int


# -- Shipping ----------------------------------------------------------------------------------------


class OrderShipped(IntegrationEvent):
    __source__ = "shipping"
    __event_type__ = "shop.OrderShipped"
    order_id: str
    tracking: str
    city: str


# -- Commands (sent by the checkout saga; each has one owner) -------------------------------------------


class ReserveStock(Command):
    __owner__ = "inventory"
    __event_type__ = "shop.ReserveStock"
    order_id: str
    customer_id: str
    sku: str
    quantity: int
    amount: int
    card: str


class ReleaseStock(Command):
    __owner__ = "inventory"
    __event_type__ = "shop.ReleaseStock"
    order_id: str
    sku: str


class AuthorizePayment(Command):
    __owner__ = "payments"
    __event_type__ = "shop.AuthorizePayment"
    order_id: str
    amount: int
    card: str


class CapturePayment(Command):
    __owner__ = "payments"
    __event_type__ = "shop.CapturePayment"
    order_id: str
    customer_id: str
    sku: str
    quantity: int


class VoidPayment(Command):
    __owner__ = "payments"
    __event_type__ = "shop.VoidPayment"
    order_id: str


class RefundPayment(Command):
    __owner__ = "payments"
    __event_type__ = "shop.RefundPayment"
    order_id: str


class ShipOrder(Command):
    __owner__ = "shipping"
    __event_type__ = "shop.ShipOrder"
    order_id: str
    customer_id: str
