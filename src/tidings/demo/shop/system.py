"""Putting the shop together: build any one service by name, and run all six in this process.

:func:`build_service` is the one place that knows how each service is built; the in-process
:class:`EmbeddedShop` and the worker processes (:mod:`.worker`) both use it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType

from tidings.bus import Bus, open_bus
from tidings.errors import InvalidArgument
from tidings.service import Service
from tidings.store.base import EventStore

from . import customers, emails, inventory, orders, payments, shipping
from .duplicates import DuplicatingBus
from .wiring import SERVICES, Wiring

__all__ = ["EmbeddedShop", "build_service", "prepare_store", "store_url"]


def store_url(base: str | None, service: str, directory: Path) -> str:
    """The store of ``service``: a SQLite file in ``directory`` (``base`` None or ``sqlite``), or
    a schema of its own on the PostgreSQL server of ``base``."""
    if base is None or base.startswith("sqlite"):
        return f"sqlite:///{directory / (service + '.db')}"
    if base.startswith("postgresql://") or base.startswith("postgres://"):
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        parts = urlsplit(base)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        prefix = query.get("schema", "shop")
        query["schema"] = f"{prefix}_{service}"
        return urlunsplit(parts._replace(query=urlencode(query)))
    raise InvalidArgument(f"the shop runs on sqlite:// or postgresql:// stores, not {base!r}")


def build_service(
    name: str,
    store: EventStore | str,
    bus: Bus | str | None,
    wiring: Wiring,
    *,
    order_details: emails.OrderDetailsSource | None = None,
    mailbox: Path | None = None,
) -> Service:
    """Build the shop service ``name`` (one of :data:`~.wiring.SERVICES`) for ``wiring``."""
    if name == "email":
        if order_details is None or mailbox is None:
            raise InvalidArgument("the email service needs order_details and a mailbox")
        return emails.build(store, bus, wiring, orders=order_details, mail=emails.MailProvider(mailbox))
    builders = {
        "customers": customers.build,
        "orders": orders.build,
        "inventory": inventory.build,
        "payments": payments.build,
        "shipping": shipping.build,
    }
    if name not in builders:
        raise InvalidArgument(f"no shop service {name!r}; the services are {', '.join(SERVICES)}")
    return builders[name](store, bus, wiring)


async def prepare_store(name: str, store: EventStore) -> None:
    """Create the service's own tables (read models) before it runs."""
    if name == "orders":
        await orders.prepare_store(store)
    elif name == "shipping":
        await shipping.prepare_store(store)


class EmbeddedShop:
    """All six services in this process, each with its own store, on one shared bus."""

    def __init__(
        self,
        wiring: Wiring,
        directory: Path,
        *,
        store: str | None,
        bus: str | None,
        duplicate_rate: float,
        seed: int,
    ) -> None:
        self.wiring = wiring
        self.directory = directory
        self.mailbox = directory / "mailbox.jsonl"
        # Many partitions: a slow payment holds up only the orders that share its partition (the
        # others' deadlines must not trip because of it).
        self.inner = open_bus(bus or "memory://?partitions=48")
        self.buses = {
            name: DuplicatingBus(self.inner, duplicate_rate, seed * 1000 + i)
            for i, name in enumerate(SERVICES)
        }
        self.services: dict[str, Service] = {}
        urls = {name: store_url(store, name, directory) for name in SERVICES}
        self.services["orders"] = build_service("orders", urls["orders"], self.buses["orders"], wiring)
        self._queries: orders.OrderQueries | None = None
        for name in SERVICES:
            if name == "orders":
                continue
            self.services[name] = build_service(
                name,
                urls[name],
                self.buses[name],
                wiring,
                order_details=self,  # the query API, as a function call in one process
                mailbox=self.mailbox,
            )
        self._stack = contextlib.AsyncExitStack()

    async def details(self, order_id: str) -> orders.OrderDetails | None:
        if self._queries is None:
            self._queries = orders.OrderQueries(self.services["orders"].store)
        return await self._queries.details(order_id)

    @property
    def stores(self) -> dict[str, EventStore]:
        return {name: service.store for name, service in self.services.items()}

    async def __aenter__(self) -> EmbeddedShop:
        await self._stack.__aenter__()
        try:
            await self._stack.enter_async_context(self.inner)
            for name, service in self.services.items():
                await self._stack.enter_async_context(service)
                await prepare_store(name, service.store)
            for service in self.services.values():
                await self._stack.enter_async_context(service.running())
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.__aexit__(kind, exc, tb)

    async def kill_and_restart(self, service: str) -> int:
        raise InvalidArgument("killing a service needs the multi-process mode (processes=True)")

    def duplicates(self) -> tuple[int, int]:
        """(injected, absorbed by the services' inboxes)."""
        injected = sum(bus.injected for bus in self.buses.values())
        absorbed = sum(service.duplicates_skipped for service in self.services.values())
        return injected, absorbed
