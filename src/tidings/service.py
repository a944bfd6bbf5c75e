"""The composition root: a service declares its handlers and projections, then runs them.

::

    service = Service("billing", store="sqlite:///billing.db")

    @service.handles(OrderPlaced)
    async def charge(event: OrderPlaced, ctx: HandlerContext) -> None:
        ctx.emit(f"invoice-{event.order_id}", [InvoiceIssued(order_id=event.order_id)])

    service.add_projection(Revenue())
    await service.run()          # or: tidings run billing.app:service

On the embedded default the bus is the store's global log in this process: publishing an event is
appending it, and every handler and projection is a checkpointed subscription over the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

from tidings.errors import InvalidArgument, TidingsError
from tidings.events import Event
from tidings.processing.handlers import Dispatch, EventHandler, HandlerFunction, handler_methods
from tidings.processing.projections import Projection, ProjectionSubscription
from tidings.processing.subscription import (
    HandlerSubscription,
    Subscription,
    SubscriptionConfig,
    SubscriptionStats,
)
from tidings.store import open_store
from tidings.store.append import ANY, AppendResult, ExpectedVersion
from tidings.store.base import EventStore
from tidings.store.tracking import SQLStore, TrackingStore, require

__all__ = ["Service"]

F = TypeVar("F", bound=HandlerFunction)
log = logging.getLogger("tidings.service")


class Service:
    """Registers handlers and projections and runs each as a subscription over one store.

    ``store`` is an :class:`EventStore` (opened or not) or a URL. Group names default to
    ``"<service>.<handler>"``; a group's checkpoint, inbox and dead letters are keyed by it, so
    keep it stable across deployments (pass ``group=`` when renaming a function).
    """

    def __init__(
        self,
        name: str,
        store: EventStore | str | None = None,
        *,
        config: SubscriptionConfig | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"service name must be a non-empty str, got {name!r}")
        self.name = name
        self._store_arg = store
        self._store: EventStore | None = store if isinstance(store, EventStore) else None
        self.config = config or SubscriptionConfig()
        self._handlers: dict[str, tuple[Dispatch, str | None, SubscriptionConfig]] = {}
        self._projections: dict[str, tuple[Projection, SubscriptionConfig]] = {}
        self._subscriptions: list[Subscription] = []
        self._running = False
        self._stop_requested = False
        self._owns_store = False
        # Created per event loop (see _events): a module-level service may be run by several
        # asyncio.run() calls, and an asyncio.Event belongs to the loop that first waits on it.
        self._events_loop: asyncio.AbstractEventLoop | None = None
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()

    # -- declaration ------------------------------------------------------------------------------

    def handles(
        self,
        *event_types: type[Event],
        group: str | None = None,
        stream_prefix: str | None = None,
        config: SubscriptionConfig | None = None,
    ) -> Callable[[F], F]:
        """Decorator: run the function for each event of these types, as its own group."""
        if not event_types or not all(isinstance(t, type) and issubclass(t, Event) for t in event_types):
            raise InvalidArgument("handles() takes one or more Event classes")

        def decorate(fn: F) -> F:
            name = group or f"{self.name}.{fn.__name__}"
            self._add(name, Dispatch({t: fn for t in event_types}), stream_prefix, config)
            return fn

        return decorate

    def add_handler(
        self, handler: EventHandler, *, group: str | None = None, config: SubscriptionConfig | None = None
    ) -> None:
        """Register a class-based handler; its methods are dispatched by their event annotation."""
        table = handler_methods(handler)
        if not table:
            raise InvalidArgument(
                f"{type(handler).__qualname__} has no methods whose first parameter is annotated "
                "with an Event class"
            )
        name = group or handler.group or f"{self.name}.{type(handler).__name__}"
        self._add(name, Dispatch(table), handler.stream_prefix, config)

    def add_projection(self, projection: Projection, *, config: SubscriptionConfig | None = None) -> None:
        """Register a projection (a SQL read model in the store's database)."""
        if projection.name in self._projections:
            raise InvalidArgument(f"projection {projection.name!r} is already registered")
        self._projections[projection.name] = (projection, config or self.config)

    def _add(
        self, group: str, dispatch: Dispatch, prefix: str | None, config: SubscriptionConfig | None
    ) -> None:
        if group in self._handlers:
            raise InvalidArgument(f"subscription group {group!r} is already registered")
        self._handlers[group] = (dispatch, prefix, config or self.config)

    def use_store(self, store: EventStore | str) -> None:
        """Replace the service's store (before it runs), e.g. from ``tidings run --store``."""
        if self._running:
            raise TidingsError(f"service {self.name!r} is running; cannot change its store")
        self._store_arg = store
        self._store = store if isinstance(store, EventStore) else None

    @property
    def projections(self) -> Mapping[str, Projection]:
        return {name: p for name, (p, _) in self._projections.items()}

    @property
    def groups(self) -> list[str]:
        """The handler groups this service runs (projection groups carry their generation)."""
        return list(self._handlers)

    # -- running ----------------------------------------------------------------------------------

    @property
    def store(self) -> EventStore:
        if self._store is None:
            raise TidingsError(f"service {self.name!r} has no open store; call start() or run()")
        return self._store

    async def open(self) -> EventStore:
        """Open the store if the service was given a URL (idempotent); return it."""
        if self._store is None:
            url = self._store_arg if isinstance(self._store_arg, str) else "sqlite:///tidings.db"
            self._store = open_store(url)
            self._owns_store = True
        if not self._store.is_open:
            await self._store.open()
        return self._store

    def subscription(self, group: str) -> Subscription:
        """A new runner for one of this service's groups (used by tools such as ``dlq retry``)."""
        store = require(self.store, TrackingStore, f"service {self.name!r}")
        if group in self._handlers:
            dispatch, prefix, config = self._handlers[group]
            return HandlerSubscription(store, group, dispatch, stream_prefix=prefix, config=config)
        for projection, config in self._projections.values():
            if group.startswith(projection.group_prefix + ":") or group == projection.name:
                return ProjectionSubscription(store, projection, config=config)
        raise InvalidArgument(f"service {self.name!r} has no subscription group {group!r}")

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        loop = asyncio.get_running_loop()
        if self._events_loop is not loop:
            self._events_loop = loop
            self._stopping, self._started = asyncio.Event(), asyncio.Event()
        return self._stopping, self._started

    async def run(self) -> None:
        """Run every subscription until :meth:`stop`; then finish in-flight work and return.

        Each subscription is isolated: one group's failing handler never stops another group.
        A stop requested while the store is still opening is honoured once it is open. The
        store is closed on return if the service opened it.
        """
        if self._running:
            raise TidingsError(f"service {self.name!r} is already running")
        self._running = True
        stopping, started = self._events()
        tasks: list[asyncio.Task[None]] = []
        close_store = self._store is None or not self._store.is_open
        try:
            store = await self.open()
            if self._stop_requested:
                return
            self._subscriptions = [self.subscription(group) for group in self._handlers]
            self._subscriptions += [
                ProjectionSubscription(store, projection, config=config)
                for projection, config in self._projections.values()
            ]
            tasks = [asyncio.create_task(s.run(), name=f"tidings:{s.group}") for s in self._subscriptions]
            started.set()
            await stopping.wait()
        finally:
            for sub in self._subscriptions:
                sub.stop()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            self._running = False
            self._stop_requested = False
            stopping.clear()
            started.clear()
            if close_store and self._store is not None:
                await self._store.close()
                self._store = None if self._owns_store else self._store
        errors = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
        ]
        if errors:
            raise BaseExceptionGroup(f"service {self.name!r}: subscriptions failed", errors)

    async def serve(self) -> None:
        """Run until SIGINT or SIGTERM, then shut down gracefully (what ``tidings run`` calls).

        On a signal, runners stop taking events, finish the one in hand, commit their
        checkpoints, and this returns normally.
        """
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)
        try:
            await self.run()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    def stop(self) -> None:
        """Ask :meth:`run` to stop: runners finish the event in hand, commit, and return.

        Does nothing if the service is not running.
        """
        if self._running:
            self._stop_requested = True
            self._stopping.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Service]:
        """``async with service.running():`` runs the service in the background for the block.

        Entering waits until the subscriptions have started (or raises what stopped ``run``).
        """
        task = asyncio.create_task(self.run())
        _, started = self._events()
        ready = asyncio.ensure_future(started.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task.done():
            task.result()  # failed to start (already running, store error): raise that
            raise TidingsError(f"service {self.name!r} stopped while starting")
        try:
            yield self
        finally:
            self.stop()
            await task

    def statistics(self) -> list[SubscriptionStats]:
        """One :class:`SubscriptionStats` per running subscription."""
        return [s.statistics() for s in self._subscriptions]

    # -- the in-process bus -------------------------------------------------------------------------

    async def publish(
        self,
        stream_id: str,
        events: Iterable[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        metadata: Mapping[str, Any] | None = None,
    ) -> AppendResult:
        """Publish events: append them to the store; every subscribed group will see them."""
        store = await self.open()
        return await store.append(stream_id, events, expected_version=expected_version, metadata=metadata)

    async def wait_for(
        self, position: int, *, group: str | None = None, timeout: float | None = 10.0
    ) -> bool:
        """Wait until ``group`` (default: every group of this service) has processed ``position``.

        ``group`` may be a handler group or a projection's name; a projection's group is looked
        up again while waiting, so a blue/green swap in the meantime is followed.
        """
        store = require(self.store, TrackingStore, f"service {self.name!r}")
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        names = [group] if group is not None else [*self._handlers, *self._projections]
        for name in names:
            while True:
                current = await self._current_group(name)
                remaining = None if deadline is None else max(0.0, deadline - loop.time())
                step = 0.2 if remaining is None else min(0.2, remaining)
                if await store.wait_for(position, group=current, timeout=step):
                    break
                if remaining is not None and remaining <= step:
                    return False
        return True

    async def _current_group(self, name: str) -> str:
        """The group to wait on now for ``name``: a projection's carries its active generation,
        read from the database (a runner that is idle may not have noticed a swap yet)."""
        projection = self._projections.get(name)
        if projection is None:
            return name
        entry = await require(self.store, SQLStore, "projections").projection_generation(projection[0].name)
        return projection[0].group(1 if entry is None else entry.generation)
