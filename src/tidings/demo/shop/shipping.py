"""Shipping: ships paid orders to the customer's current address.

* **event-carried state transfer** -- :func:`wire_address_replica`: Shipping keeps its own replica
  of every customer's address (the table ``shipping_addresses``) from the full
  ``CustomerAddressChanged`` events that Customers publishes, and never calls Customers. A change
  that arrives out of order is ignored by its ``revision``.
* **choreography** -- :func:`wire_choreography`: ship on ``PaymentCaptured``;
* **orchestration** -- :func:`wire_orchestration`: ship on the saga's ``ShipOrder``.

Each order's :class:`Shipment` is an aggregate: a duplicated delivery ships nothing twice.
"""

from __future__ import annotations

from tidings.aggregate import Aggregate
from tidings.bus.base import Bus
from tidings.errors import TidingsError
from tidings.events import Event
from tidings.processing.context import HandlerContext
from tidings.service import Service
from tidings.store.base import EventStore
from tidings.store.tracking import SQLStore, require

from .contracts import CustomerAddressChanged, OrderShipped, PaymentCaptured, ShipOrder
from .wiring import Wiring

__all__ = ["NAME", "AddressNotReplicated", "Shipment", "build", "prepare_store", "shipment_stream"]

NAME = "shipping"

REPLICA_DDL = (
    "CREATE TABLE IF NOT EXISTS shipping_addresses (customer_id TEXT PRIMARY KEY, "
    "revision INTEGER NOT NULL, name TEXT NOT NULL, street TEXT NOT NULL, city TEXT NOT NULL, "
    "postcode TEXT NOT NULL, country TEXT NOT NULL)"
)


class AddressNotReplicated(TidingsError):
    """The customer's address has not reached Shipping's replica yet: wait for it (transient)."""

    transient = True


class ShipmentDispatched(Event):
    __event_type__ = "shop.shipping.ShipmentDispatched"
    customer_id: str
    name: str
    street: str
    city: str
    postcode: str
    country: str
    tracking: str


class Shipment(Aggregate):
    shipped: bool = False
    city: str = ""
    tracking: str = ""

    def dispatch(self, customer_id: str, address: tuple[str, str, str, str, str]) -> bool:
        if self.shipped:
            return False
        name, street, city, postcode, country = address
        tracking = f"TRK-{self.id.removeprefix('shipment-')}"
        self.record(
            ShipmentDispatched(
                customer_id=customer_id,
                name=name,
                street=street,
                city=city,
                postcode=postcode,
                country=country,
                tracking=tracking,
            )
        )
        return True

    def apply(self, event: Event) -> None:
        match event:
            case ShipmentDispatched(city=city, tracking=tracking):
                self.shipped, self.city, self.tracking = True, city, tracking


def shipment_stream(order_id: str) -> str:
    return f"shipment-{order_id}"


async def prepare_store(store: EventStore) -> None:
    await require(store, SQLStore, "Shipping").transaction(lambda tx: tx.execute(REPLICA_DDL))


async def replicated_addresses(store: EventStore) -> int:
    rows = await require(store, SQLStore, "Shipping").query("SELECT COUNT(*) FROM shipping_addresses")
    return int(rows[0][0])


async def _ship(ctx: HandlerContext, order_id: str, customer_id: str) -> None:
    rows = await ctx.query(
        "SELECT name, street, city, postcode, country FROM shipping_addresses WHERE customer_id = ?",
        (customer_id,),
    )
    if not rows:
        raise AddressNotReplicated(f"no address of customer {customer_id!r} in Shipping's replica yet")
    shipment = await ctx.load(Shipment, shipment_stream(order_id), create=True)
    name, street, city, postcode, country = (str(v) for v in rows[0])
    shipment.dispatch(customer_id, (name, street, city, postcode, country))
    ctx.save(shipment)
    ctx.emit(
        shipment_stream(order_id),
        [OrderShipped(order_id=order_id, tracking=shipment.tracking, city=shipment.city)],
    )


def build(store: EventStore | str, bus: Bus | str | None, wiring: Wiring) -> Service:
    shipping = Service(NAME, store, bus=bus, config=wiring.subscription, ack_wait=wiring.ack_wait)
    shipping.publishes(OrderShipped)
    wire_address_replica(shipping)
    if wiring.variant == "choreography":
        wire_choreography(shipping)
    else:
        wire_orchestration(shipping)
    return shipping


def wire_address_replica(shipping: Service) -> None:
    """Event-carried state transfer: a local copy of the addresses, newest revision wins."""

    @shipping.handles(CustomerAddressChanged, group="shipping.address_replica")
    async def replicate_customer_address(event: CustomerAddressChanged, ctx: HandlerContext) -> None:
        ctx.execute(
            "INSERT INTO shipping_addresses (customer_id, revision, name, street, city, postcode, country) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (customer_id) DO UPDATE SET "
            "revision = excluded.revision, name = excluded.name, street = excluded.street, "
            "city = excluded.city, postcode = excluded.postcode, country = excluded.country "
            "WHERE shipping_addresses.revision < excluded.revision",
            (
                event.customer_id,
                event.revision,
                event.name,
                event.street,
                event.city,
                event.postcode,
                event.country,
            ),
        )


def wire_choreography(shipping: Service) -> None:
    @shipping.handles(PaymentCaptured, group="shipping.choreography.ship")
    async def ship_when_payment_captured(event: PaymentCaptured, ctx: HandlerContext) -> None:
        await _ship(ctx, event.order_id, event.customer_id)


def wire_orchestration(shipping: Service) -> None:
    @shipping.handles_command(ShipOrder, group="shipping.orchestration.ship")
    async def ship_on_command(command: ShipOrder, ctx: HandlerContext) -> None:
        await _ship(ctx, command.order_id, command.customer_id)
