"""Customers: owns customers' addresses and publishes every change *with the whole address*.

**Event-carried state transfer**, the publishing side: ``CustomerAddressChanged`` carries the full
address and a revision (the customer stream's version), so that Shipping can keep a replica and
never call back. Customers is an ordinary event-sourced service: its domain event
:class:`CustomerMoved` is translated to the integration event by :func:`wire_translations`.
"""

from __future__ import annotations

import dataclasses

from tidings.aggregate import Aggregate
from tidings.bus.base import Bus
from tidings.events import Event, RecordedEvent
from tidings.repository import Repository
from tidings.service import Service
from tidings.store.base import EventStore

from .contracts import CustomerAddressChanged
from .wiring import Wiring

__all__ = ["NAME", "Address", "Customer", "CustomerMoved", "build", "move_customer"]

NAME = "customers"


@dataclasses.dataclass(frozen=True)
class Address:
    name: str
    street: str
    city: str
    postcode: str
    country: str


class CustomerMoved(Event):
    __event_type__ = "shop.customers.CustomerMoved"
    name: str
    street: str
    city: str
    postcode: str
    country: str


class Customer(Aggregate):
    name: str = ""
    city: str = ""

    def move(self, address: Address) -> None:
        self.record(CustomerMoved(**dataclasses.asdict(address)))

    def apply(self, event: Event) -> None:
        match event:
            case CustomerMoved(name=name, city=city):
                self.name, self.city = name, city


async def move_customer(store: EventStore, customer_id: str, address: Address) -> None:
    """Customers' API: register a customer or change their address."""
    repository = Repository(store, Customer)
    customer = await repository.get(customer_id, create=True)
    customer.move(address)
    await repository.save(customer)


def build(store: EventStore | str, bus: Bus | str | None, wiring: Wiring) -> Service:
    customers = Service(NAME, store, bus=bus, config=wiring.subscription, ack_wait=wiring.ack_wait)
    wire_translations(customers)
    return customers


def wire_translations(customers: Service) -> None:
    @customers.translates(CustomerMoved)
    def address_changed(event: CustomerMoved, recorded: RecordedEvent) -> CustomerAddressChanged:
        return CustomerAddressChanged(
            customer_id=recorded.stream_id,
            revision=recorded.version,
            name=event.name,
            street=event.street,
            city=event.city,
            postcode=event.postcode,
            country=event.country,
        )
