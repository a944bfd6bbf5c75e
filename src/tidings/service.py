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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

from tidings.bus import Bus, DeliveryPolicy, open_bus
from tidings.bus.inbound import BusHandlerGroup
from tidings.bus.relay import OutboxRelay, Translator, command_types
from tidings.commands import Command
from tidings.errors import InvalidArgument, TidingsError, UnsupportedOperation
from tidings.events import Event
from tidings.integration import IntegrationEvent, source_of
from tidings.metrics import MetricsConfig, MetricsServer, require_prometheus
from tidings.processing.context import HandlerContext
from tidings.processing.handlers import Dispatch, EventHandler, HandlerFunction, call_handler, handler_methods
from tidings.processing.handling import HandlerSubscription
from tidings.processing.projections import Projection, ProjectionSubscription
from tidings.processing.subscription import (
    Subscription,
    SubscriptionConfig,
    SubscriptionStats,
)
from tidings.sagas.clock import Clock, SystemClock
from tidings.sagas.definition import Saga
from tidings.sagas.runtime import DeadlineTimer, SagaHandler, ensure_saga_index
from tidings.store import open_store
from tidings.store.append import ANY, AppendResult, ExpectedVersion
from tidings.store.base import EventStore
from tidings.store.tracking import SQLStore, TrackingStore, require

__all__ = ["Service"]

F = TypeVar("F", bound=HandlerFunction)
T = TypeVar("T", bound=Callable[..., Any])
log = logging.getLogger("tidings.service")


class Service:
    """Registers handlers and projections and runs each as a subscription over one store.

    ``store`` is an :class:`EventStore` (opened or not) or a URL. Group names default to
    ``"<service>.<handler>"``; a group's checkpoint, inbox and dead letters are keyed by it, so
    keep it stable across deployments (pass ``group=`` when renaming a function).

    ``ack_wait`` (seconds) is how long the bus waits for a bus-fed handler's acknowledgement
    before it redelivers the message elsewhere -- the failover bound of a killed process (a live
    one extends it while its handler runs); the bus's default when None.

    ``metrics`` serves the service's Prometheus metrics while it runs (see
    :class:`~tidings.MetricsConfig`; needs ``pip install 'tidings[metrics]'``, or raises
    :class:`~tidings.MissingExtra`).
    """

    def __init__(
        self,
        name: str,
        store: EventStore | str | None = None,
        *,
        bus: Bus | str | None = None,
        config: SubscriptionConfig | None = None,
        ack_wait: float | None = None,
        metrics: MetricsConfig | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"service name must be a non-empty str, got {name!r}")
        self.name = name
        self._store_arg = store
        self._store: EventStore | None = store if isinstance(store, EventStore) else None
        self.config = config or SubscriptionConfig()
        if ack_wait is not None and (
            not isinstance(ack_wait, int | float) or isinstance(ack_wait, bool) or ack_wait <= 0
        ):
            raise InvalidArgument(f"ack_wait must be > 0 seconds, got {ack_wait!r}")
        self.ack_wait = ack_wait
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
        self._on_start: list[Callable[[], Awaitable[None]]] = []
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self._commands: dict[type[Command], str] = {}
        self._bus_arg = bus
        self._bus: Bus | None = bus if isinstance(bus, Bus) else None
        self._owns_bus = False
        self._published: list[type[IntegrationEvent]] = []
        self._translators: dict[type[Event], Translator] = {}
        self._relay: OutboxRelay | None = None
        self._close_requested = False
        self._inbound: list[BusHandlerGroup] = []
        self._skipped_before = 0
        self._sagas: dict[str, tuple[Saga, Clock]] = {}
        self._timers: list[DeadlineTimer] = []
        self._metrics: MetricsConfig | None = None
        self._metrics_server: MetricsServer | None = None
        self.use_metrics(metrics)

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

    def handles_command(
        self,
        command_type: type[Command],
        *,
        group: str | None = None,
        config: SubscriptionConfig | None = None,
    ) -> Callable[[F], F]:
        """Decorator: this service owns ``command_type`` and handles it with the function.

        A command has one owner: a second handler for the same command type in this service is
        refused. Commands addressed to another service (``destination`` in their metadata, as
        sagas send them) are not this service's to handle and are skipped. The handler answers
        with events (``ctx.emit``); they carry the sender's ``saga_id``, so a saga finds its reply.
        """
        if not (isinstance(command_type, type) and issubclass(command_type, Command)):
            raise InvalidArgument(f"handles_command() takes a Command class, got {command_type!r}")
        if command_type in self._commands:
            raise InvalidArgument(
                f"service {self.name!r} already handles {command_type.__qualname__} "
                f"(group {self._commands[command_type]!r}); a command has one owner"
            )

        def decorate(fn: F) -> F:
            name = group or f"{self.name}.{fn.__name__}"
            owner = self.name

            async def owned(command: Command, ctx: HandlerContext) -> None:
                destination = ctx.recorded.metadata.get("destination")
                if destination is not None and destination != owner:
                    return
                await call_handler(fn, command, ctx, span=False)

            self._add(name, Dispatch({command_type: owned}), None, config)
            self._commands[command_type] = name
            return fn

        return decorate

    def publishes(self, *event_types: type[IntegrationEvent]) -> None:
        """Declare integration events this service publishes as they are appended (its handlers
        emit them, or it appends them): the relay puts them on the bus. Each must name this
        service as its ``__source__``."""
        for cls in event_types:
            if source_of(cls) != self.name:
                raise InvalidArgument(
                    f"{getattr(cls, '__qualname__', cls)!r} is not an integration event of service "
                    f"{self.name!r} (its __source__ must be {self.name!r})"
                )
            if cls not in self._published:
                self._published.append(cls)

    def translates(self, domain_type: type[Event]) -> Callable[[T], T]:
        """Decorator: publish each ``domain_type`` event as the integration event the function
        returns (or nothing, if it returns None)::

            @orders.translates(OrderPlaced)
            def submitted(event: OrderPlaced, recorded: RecordedEvent) -> OrderSubmitted:
                return OrderSubmitted(order_id=recorded.stream_id, total=event.total)

        The domain event is in the log, atomically with the change that caused it; the relay
        translates and publishes it, with an id derived from the domain event's (so a re-publish
        is recognised) and the domain event as its causation.
        """
        if not (isinstance(domain_type, type) and issubclass(domain_type, Event)):
            raise InvalidArgument(f"translates() takes an Event class, got {domain_type!r}")
        if domain_type in self._translators:
            raise InvalidArgument(f"{domain_type.__qualname__} already has a translator in {self.name!r}")

        def decorate(fn: T) -> T:
            self._translators[domain_type] = fn
            return fn

        return decorate

    def use_bus(self, bus: Bus | str) -> None:
        """Replace the service's bus (before it runs), e.g. from ``tidings run --bus``."""
        if self._running:
            raise TidingsError(f"service {self.name!r} is running; cannot change its bus")
        self._bus_arg = bus
        self._bus = bus if isinstance(bus, Bus) else None

    def use_metrics(self, metrics: MetricsConfig | None) -> None:
        """Serve the service's Prometheus metrics where ``metrics`` says (None: not at all) from
        its next start, e.g. from ``tidings run --metrics-port``. Raises
        :class:`~tidings.MissingExtra` without the ``metrics`` extra, and
        :class:`~tidings.InvalidArgument` for anything but a :class:`~tidings.MetricsConfig`."""
        if self._running:
            raise TidingsError(f"service {self.name!r} is running; cannot change its metrics endpoint")
        if metrics is not None:
            if not isinstance(metrics, MetricsConfig):
                raise InvalidArgument(f"metrics must be a tidings.MetricsConfig, got {metrics!r:.80}")
            require_prometheus()
        self._metrics = metrics

    @property
    def metrics_url(self) -> str | None:
        """``http://host:port/metrics`` while the service runs and serves its metrics, else None."""
        return None if self._metrics_server is None else self._metrics_server.url

    @property
    def relay(self) -> OutboxRelay | None:
        """The outbox relay while the service runs one (it has a bus and events to publish)."""
        return self._relay

    def add_saga(
        self, saga: Saga, *, clock: Clock | None = None, config: SubscriptionConfig | None = None
    ) -> None:
        """Run ``saga`` in this service: its instances advance in the group ``saga:<name>`` and its
        deadlines fire from a timer beside the subscriptions. Needs a SQL store (the saga index)."""
        if not isinstance(saga, Saga):
            raise InvalidArgument(f"add_saga() takes a Saga instance, got {saga!r}")
        if saga.name in self._sagas:
            raise InvalidArgument(f"saga {saga.name!r} is already registered")
        clock = clock or SystemClock()
        handler = SagaHandler(saga, clock)
        self._add(f"saga:{saga.name}", Dispatch(dict.fromkeys(handler.event_types(), handler)), None, config)
        self._sagas[saga.name] = (saga, clock)

    @property
    def sagas(self) -> Mapping[str, Saga]:
        return {name: saga for name, (saga, _) in self._sagas.items()}

    def add_handler(
        self, handler: EventHandler, *, group: str | None = None, config: SubscriptionConfig | None = None
    ) -> None:
        """Register a class-based handler; its methods are dispatched by their event annotation."""
        if not isinstance(handler, EventHandler):
            hint = " (an instance, not the class)" if isinstance(handler, type) else ""
            raise InvalidArgument(f"add_handler() takes an EventHandler{hint}, got {handler!r:.80}")
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
        if not isinstance(projection, Projection):
            hint = " (an instance, not the class)" if isinstance(projection, type) else ""
            raise InvalidArgument(f"add_projection() takes a Projection{hint}, got {projection!r:.80}")
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

    def runs_group(self, group: str) -> bool:
        """Whether ``group`` (as named on a dead letter) is one of this service's handler groups or
        a generation of one of its projections. A bus consumer's letters (``<group>@bus``) count as
        the group's: retrying them then fails with the reason (see :meth:`subscription`)."""
        group = group.removesuffix("@bus")
        return group in self._handlers or any(
            group.startswith(projection.group_prefix + ":") for projection, _ in self._projections.values()
        )

    # -- running ----------------------------------------------------------------------------------

    def on_start(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Decorator: await ``fn()`` once the store is open and every subscription has started."""
        self._on_start.append(fn)
        return fn

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """Decorator: await ``fn()`` after the subscriptions have stopped, before the store closes."""
        self._on_stop.append(fn)
        return fn

    @property
    def bus_url(self) -> str | None:
        """The URL of the service's bus (as given, or the given bus's), or None if it has none."""
        if self._bus is not None:
            return self._bus.url
        return self._bus_arg if isinstance(self._bus_arg, str) else None

    @property
    def store_url(self) -> str | None:
        """The URL of the service's store (as given, or the given store's), or None if it has none."""
        if self._store is not None:
            return self._store.url
        return self._store_arg if isinstance(self._store_arg, str) else None

    @property
    def store(self) -> EventStore:
        """The service's store; raises :class:`TidingsError` before :meth:`open` (or ``async with``)."""
        if self._store is None:
            raise TidingsError(
                f"service {self.name!r} has no open store; use 'async with service:', "
                "await service.open() or service.run()"
            )
        return self._store

    async def open(self) -> EventStore:
        """Open the store (and connect the bus) if the service was given URLs (idempotent); return
        the store.

        Raises :class:`TidingsError` if the service was given no store at all: a service never
        invents a database file of its own; a bus that is misconfigured or unreachable raises its
        :class:`~tidings.bus.BusError` here, before anything runs.
        """
        if self._store is None:
            if not isinstance(self._store_arg, str):
                raise TidingsError(
                    f"service {self.name!r} has no store: pass Service(..., store=URL), call "
                    "use_store(), or run it with 'tidings run --store URL' (or TIDINGS_STORE)"
                )
            self._store = open_store(self._store_arg)
            self._owns_store = True
        if not self._store.is_open:
            await self._store.open()
        await self._open_bus()
        return self._store

    async def close(self) -> None:
        """Stop the service if it runs and close the store (and bus) if the service opened them.
        Called while :meth:`run` is running, it asks it to stop, and run() closes them on its way
        out. Idempotent."""
        if self._running:
            self._close_requested = True
        self.stop()
        if self._owns_bus and self._bus is not None and not self._running:
            await self._bus.close()
            self._bus, self._owns_bus = None, False
        if self._owns_store and self._store is not None and not self._running:
            await self._store.close()
            self._store = None

    async def __aenter__(self) -> Service:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _open_bus(self) -> Bus | None:
        if self._bus is None and isinstance(self._bus_arg, str):
            self._bus = open_bus(self._bus_arg)
            self._owns_bus = True
            await self._bus.open()
        return self._bus

    def _source(self, cls: type[Event]) -> str | None:
        """The bus subject space events of ``cls`` arrive in: its publisher's for an integration
        event, this service's own for a command (senders publish commands to their destination)."""
        return self.name if issubclass(cls, Command) else source_of(cls)

    def _is_foreign(self, cls: type[Event], bus: Bus | None) -> bool:
        """Whether events of ``cls`` reach this service over the bus rather than its own log."""
        if bus is None:
            return False
        return issubclass(cls, Command) or source_of(cls) not in (None, self.name)

    def _local_dispatch(self, group: str, bus: Bus | None) -> Dispatch | None:
        dispatch = self._handlers[group][0]
        table = {cls: fn for cls, fn in dispatch.table.items() if not self._is_foreign(cls, bus)}
        return Dispatch(table) if table else None

    def _bus_groups(self, store: TrackingStore, bus: Bus | None) -> list[BusHandlerGroup]:
        out: list[BusHandlerGroup] = []
        if bus is None:
            return out
        for group, (dispatch, _, config) in self._handlers.items():
            table = {cls: fn for cls, fn in dispatch.table.items() if self._is_foreign(cls, bus)}
            if not table:
                continue
            sources: dict[str, set[str]] = {}
            for cls in table:
                source = self._source(cls)
                assert source is not None
                sources.setdefault(source, set()).update(
                    sub.__event_type__ for sub in (cls, *_subclasses_of(cls))
                )
            out.append(
                BusHandlerGroup(
                    store,
                    bus,
                    self.name,
                    group,
                    Dispatch(table),
                    sources,
                    delivery=_delivery_policy(config, self.ack_wait),
                    sql=_has_sql(store),
                )
            )
        return out

    def subscription(self, group: str) -> Subscription:
        """A new runner for one of this service's groups (used by tools such as ``dlq retry``)."""
        store = require(self.store, TrackingStore, f"service {self.name!r}")
        if group == f"{self.name}.relay" and self._relay is not None:
            return self._relay
        if group.endswith("@bus"):
            raise UnsupportedOperation(
                f"dead letters of {group!r} came from the bus: the message is not in this service's "
                "log, so it cannot be handled again from here (see it with 'tidings dlq show'; the "
                "publisher can publish it again, which the inbox admits since it was never committed)"
            )
        if group in self._handlers:
            dispatch, prefix, config = self._handlers[group]
            local = self._local_dispatch(group, self._bus)
            dispatch = local if local is not None else dispatch
            return HandlerSubscription(
                store,
                group,
                dispatch,
                stream_prefix=prefix,
                config=config,
                sql=_has_sql(store),
                service=self.name,
            )
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
        close_bus = self._bus is None  # run() connected it: run() disconnects it
        try:
            if self._metrics is not None:
                # Bound first: a port in use fails the start before anything runs.
                server = MetricsServer(self, self._metrics)
                await server.start()
                self._metrics_server = server
            store = await self.open()
            if self._stop_requested:
                return
            if (self._projections or self._sagas) and not _has_sql(store):
                raise UnsupportedOperation(
                    f"service {self.name!r}: projections and sagas need a SQL database, and "
                    f"{store.safe_url} has none; use a sqlite:/// or postgresql:// store"
                )
            tracking = require(store, TrackingStore, f"service {self.name!r}")
            sql_store = store if isinstance(store, SQLStore) else None
            if sql_store is not None and self._sagas:
                await ensure_saga_index(sql_store)
            bus = await self._open_bus()
            local_groups = [group for group in self._handlers if self._local_dispatch(group, bus) is not None]
            self._subscriptions = [self.subscription(group) for group in local_groups]
            if bus is not None:
                # Start-up creates or checks this service's stream, as 'tidings bus setup' does: a
                # misconfiguration (a partition count that differs from the live stream's) fails here.
                await bus.setup(publishing=[self.name])
            if bus is not None and (self._published or self._translators or command_types(store)):
                self._relay = OutboxRelay(
                    tracking,
                    bus,
                    self.name,
                    published=self._published,
                    translators=self._translators,
                    config=self.config,
                )
                self._subscriptions.append(self._relay)
            self._inbound = self._bus_groups(tracking, bus)
            for inbound in self._inbound:
                await inbound.start()
            self._subscriptions += [
                ProjectionSubscription(store, projection, config=config)
                for projection, config in self._projections.values()
            ]
            tasks = [
                asyncio.create_task(self._supervise(s), name=f"tidings:{s.group}")
                for s in self._subscriptions
            ]
            self._timers = [
                DeadlineTimer(sql_store, saga, clock, self.config.poll_interval)
                for saga, clock in self._sagas.values()
                if sql_store is not None
            ]
            tasks += [
                asyncio.create_task(timer.run(stopping), name=f"tidings:saga-timer:{timer.saga.name}")
                for timer in self._timers
            ]
            started.set()
            for hook in self._on_start:
                await hook()
            await stopping.wait()
        finally:
            # Whatever ended run() (a stop, a failing on_start hook, a cancellation), everything it
            # started must end too: the saga timers wait for this event.
            stopping.set()
            if self._metrics_server is not None:
                await self._metrics_server.close()
                self._metrics_server = None
            for inbound in self._inbound:
                with contextlib.suppress(Exception):
                    await inbound.stop()
            self._skipped_before += sum(inbound.skipped_duplicates for inbound in self._inbound)
            self._inbound = []
            for sub in self._subscriptions:
                sub.stop()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for hook in self._on_stop:
                try:
                    await hook()
                except Exception:
                    log.exception("service %r: an on_stop hook failed", self.name)
            self._running = False
            self._stop_requested = False
            self._relay = None
            stopping.clear()
            started.clear()
            if self._close_requested:  # close() was called while running: close what it owns
                close_bus = True
                close_store = close_store or self._owns_store
                self._close_requested = False
            if close_bus and self._owns_bus and self._bus is not None:
                with contextlib.suppress(Exception):
                    await self._bus.close()
                self._bus, self._owns_bus = None, False
            if close_store and self._store is not None:
                await self._store.close()
                self._store = None if self._owns_store else self._store
        errors = [
            r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
        ]
        if errors:
            raise BaseExceptionGroup(f"service {self.name!r}: subscriptions failed", errors)

    async def _supervise(self, subscription: Subscription) -> None:
        """Run one subscription; if it ever ends or dies while the service runs, log it loudly and
        start it again after a growing pause. A runner never stops silently."""
        failures = 0
        while True:
            try:
                await subscription.run()
            except Exception as exc:
                failures += 1
                subscription.state = "failed"
                subscription.last_error = f"{type(exc).__name__}: {exc}"
                log.error(
                    "service %r: the runner of %r died; restarting it",
                    self.name,
                    subscription.group,
                    exc_info=exc,
                )
            if subscription.stopping:
                return
            if failures == 0:
                failures = 1
                log.error(
                    "service %r: the runner of %r returned unexpectedly; restarting it",
                    self.name,
                    subscription.group,
                )
            await subscription.pause(min(subscription.config.failure_backoff, 0.1 * 2 ** min(failures, 10)))

    async def serve(
        self,
        *,
        on_start: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        """Run until SIGINT or SIGTERM, then shut down gracefully (what ``tidings run`` calls).

        ``on_start`` is called once the signals are handled (to tell the user how to stop).
        On a signal, ``on_stop`` is called (to tell the user), runners stop taking events, finish
        the one in hand, commit their checkpoints, and this returns normally. A second SIGINT
        while they finish forces the stop: the runners are cancelled at once, the events in
        hand are not committed (they are delivered again at the next start), and this raises
        :class:`KeyboardInterrupt`.
        """
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        signalled: list[int] = []

        def on_signal(sig: signal.Signals) -> None:
            if not signalled:
                signalled.append(sig)
                if on_stop is not None:
                    on_stop()
                self.stop()
            elif sig == signal.SIGINT and task is not None and len(signalled) == 1:
                signalled.append(sig)
                task.cancel("forced stop: a second SIGINT")

        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            if on_start is not None:
                on_start()
            await self.run()
        except asyncio.CancelledError:
            if len(signalled) > 1:
                raise KeyboardInterrupt from None
            raise
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

    @property
    def duplicates_skipped(self) -> int:
        """Bus deliveries that this service's inboxes recognised as handled before and skipped
        (redeliveries and re-publishes), counted since this object was created."""
        return self._skipped_before + sum(inbound.skipped_duplicates for inbound in self._inbound)

    def statistics(self) -> list[SubscriptionStats]:
        """One :class:`SubscriptionStats` per running subscription, and per bus-fed handler group."""
        return [s.statistics() for s in self._subscriptions] + [g.statistics() for g in self._inbound]

    # -- the in-process bus -------------------------------------------------------------------------

    async def publish(
        self,
        stream_id: str,
        events: Iterable[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        metadata: Mapping[str, Any] | None = None,
    ) -> AppendResult:
        """Publish events: append them to the store; every subscribed group will see them.

        The events' metadata carries ``service`` (this service's name) unless ``metadata`` sets it."""
        store = await self.open()
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidArgument(f"metadata must be a mapping, got {type(metadata).__qualname__}")
        metadata = {"service": self.name, **(metadata or {})}
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


def _delivery_policy(config: SubscriptionConfig, ack_wait: float | None) -> DeliveryPolicy:
    """The bus retry policy of a handler group: the same attempts and delays as its log retries,
    and the service's ``ack_wait`` if it set one."""
    retry = config.retry
    delays = tuple(
        min(retry.max_delay, retry.initial_delay * retry.multiplier**n) for n in range(retry.max_attempts)
    )
    if ack_wait is None:
        return DeliveryPolicy(max_deliver=retry.max_attempts, backoff=delays)
    return DeliveryPolicy(max_deliver=retry.max_attempts, backoff=delays, ack_wait=ack_wait)


def _subclasses_of(cls: type[Event]) -> list[type[Event]]:
    out: list[type[Event]] = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses_of(sub)]
    return out


def _has_sql(store: EventStore) -> bool:
    """Whether handlers of this store can write SQL with their effects (``ctx.execute``)."""
    return isinstance(store, SQLStore)
