"""Prometheus metrics of a running service: ``http://HOST:PORT/metrics`` while it runs.

::

    service = Service("billing", store="sqlite:///billing.db", metrics=MetricsConfig(port=9464))
    await service.run()          # or: tidings run billing.app:service --metrics-port 9464

Everything is read when Prometheus scrapes, from what the service already keeps: its runners'
:meth:`~tidings.processing.subscription.Subscription.statistics`, the database's
:func:`~tidings.processing.status.group_status`, the saga index and the store's append counters.
Nothing is added to the processing path but two integer adds per append. The endpoint is served
from the service's own event loop (the store is async and bound to it), and each service renders
a private :class:`prometheus_client.CollectorRegistry`, so two services in one process never mix
their series. Needs the ``metrics`` extra (``pip install 'tidings[metrics]'``); without it nothing
of this module is imported until a service is asked for metrics, and then it raises
:class:`~tidings.MissingExtra`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from tidings.errors import InvalidArgument, MissingExtra, StoreUnavailable, TidingsError
from tidings.processing.status import GroupStatus, group_status
from tidings.processing.subscription import SubscriptionStats
from tidings.sagas.queries import STATUSES
from tidings.store.base import EventStore
from tidings.store.tracking import SQLStore, TrackingStore

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from tidings.bus.relay import OutboxRelay
    from tidings.service import Service

__all__ = ["SCRAPE_TIMEOUT", "MetricsConfig", "MetricsError", "ServiceMetrics", "require_prometheus"]

log = logging.getLogger("tidings.metrics")

RUNNER_STATES = ("idle", "standby", "catching up", "live", "stopped", "failed")
"""The values of the ``state`` label of ``tidings_group_state`` (a runner's state in this process)."""

_ALIVE = frozenset({"live", "catching up", "failed"})
"""Group states (of :func:`group_status`) in which some process holds the group's lease."""

_REQUEST_TIMEOUT = 10.0
"""Seconds a client has to send its request line and headers before the connection is dropped."""

SCRAPE_TIMEOUT = 5.0
"""Seconds a scrape may spend reading the store before it answers 503: half Prometheus's default
scrape timeout, and far below a connection pool's wait while the database is away."""


def require_prometheus() -> None:
    """Raise :class:`~tidings.MissingExtra` naming ``pip install 'tidings[metrics]'`` if
    ``prometheus_client`` cannot be imported."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise MissingExtra("Prometheus metrics", "metrics", exc) from exc


class MetricsError(TidingsError):
    """The metrics endpoint cannot be served: the port is in use, the host is not an address of
    this machine, or binding was refused. Raised when the service starts, before anything runs."""


@dataclasses.dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Where a service serves its metrics: ``http://host:port/metrics`` while it runs.

    ``port`` 0 lets the system choose a free port (read it back from
    :attr:`Service.metrics_url <tidings.Service.metrics_url>`). ``host`` is the address to listen
    on; the default, ``127.0.0.1``, is reachable from this machine only -- use ``0.0.0.0`` (or
    the address Prometheus reaches) to expose it. Raises :class:`~tidings.InvalidArgument` for a
    port outside 0..65535 or an empty host.
    """

    port: int
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise InvalidArgument(f"metrics port must be an int in 0..65535, got {self.port!r}")
        if not isinstance(self.host, str) or not self.host.strip():
            raise InvalidArgument(f"metrics host must be a non-empty str, got {self.host!r}")


class ServiceMetrics:
    """A service's metrics in the Prometheus text format, for serving from any HTTP server.

    :meth:`render` reads the current values (querying the service's store: the service must be
    open) and returns the page; :attr:`content_type` is its HTTP content type. Each instance has
    its own registry, with the process's standard ``process_*`` and ``python_*`` series beside
    the ``tidings_*`` ones. Raises :class:`~tidings.MissingExtra` without ``prometheus_client``.
    """

    def __init__(self, service: Service) -> None:
        require_prometheus()
        from prometheus_client import (
            CONTENT_TYPE_LATEST,
            CollectorRegistry,
            GCCollector,
            PlatformCollector,
            ProcessCollector,
        )

        self.service = service
        self.content_type: str = CONTENT_TYPE_LATEST
        self._current = _Families()
        self._registry: CollectorRegistry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._current)
        # The standard collectors read /proc and the interpreter, cheaply and without touching the
        # store; each registers itself in this registry only.
        ProcessCollector(registry=self._registry)
        PlatformCollector(registry=self._registry)
        GCCollector(registry=self._registry)

    async def render(self) -> bytes:
        """The metrics page, read now. Raises what reading the store raises (a
        :class:`~tidings.TidingsError`; :class:`~tidings.StoreClosed` if the service is not open)."""
        from prometheus_client import generate_latest

        families = await collect(self.service)
        # No await between setting the families and rendering them: concurrent scrapes each render
        # their own reading.
        self._current.families = families
        return generate_latest(self._registry)


class _Families:
    """A collector that yields the families read last (prometheus_client's collect() is sync; the
    reading is async, so it happens before)."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return self.families


async def collect(service: Service) -> list[Metric]:
    """Read every ``tidings_*`` metric family of ``service`` now (see the README's table)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    store = service.store
    name = service.name
    head = await store.head()
    stats = service.statistics()
    statuses: dict[str, GroupStatus] = {}
    dead: dict[str, int] = {}
    if isinstance(store, TrackingStore):
        statuses = {status.group: status for status in await group_status(store)}
        dead = {group: status.dead_letters for group, status in statuses.items()}
        for s in stats:
            if s.group not in dead:  # a bus-fed group, or one that never committed: not listed there
                dead[s.group] = await store.count_dead_letters(s.group)

    appended = CounterMetricFamily(
        "tidings_appended_events",
        "Events appended by this process through the service's store.",
        labels=["service"],
    )
    appended.add_metric([name], store.appended_events)
    calls = CounterMetricFamily(
        "tidings_append_calls",
        "Append calls committed by this process through the service's store.",
        labels=["service"],
    )
    calls.add_metric([name], store.append_calls)
    head_family = GaugeMetricFamily(
        "tidings_head_position", "Position of the last event in the store's global log.", labels=["service"]
    )
    head_family.add_metric([name], head)
    families: list[Metric] = [appended, calls, head_family]
    families += _group_families(name, head, stats, statuses, dead)
    relay = service.relay
    if relay is not None:
        families += await _relay_families(name, store, relay, statuses)
    if service.sagas and isinstance(store, SQLStore):
        families.append(await _saga_family(name, store, list(service.sagas)))
    skipped = CounterMetricFamily(
        "tidings_bus_duplicates_skipped",
        "Bus deliveries the service's inboxes recognised as handled before and skipped.",
        labels=["service"],
    )
    skipped.add_metric([name], service.duplicates_skipped)
    families.append(skipped)
    return families


def _group_families(
    service: str,
    head: int,
    stats: Sequence[SubscriptionStats],
    statuses: dict[str, GroupStatus],
    dead: dict[str, int],
) -> list[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    labels = ["service", "group"]
    lag = GaugeMetricFamily(
        "tidings_group_lag", "Events of the log after the group's checkpoint.", labels=labels
    )
    checkpoint = GaugeMetricFamily(
        "tidings_group_checkpoint", "Position up to which the group has processed the log.", labels=labels
    )
    handled = CounterMetricFamily(
        "tidings_group_handled", "Events handled by this process's runner of the group.", labels=labels
    )
    skipped = CounterMetricFamily(
        "tidings_group_duplicates_skipped",
        "Events the group's inbox recognised as processed before and skipped (this process).",
        labels=labels,
    )
    retries = CounterMetricFamily(
        "tidings_group_retries", "Failed attempts that were retried (this process).", labels=labels
    )
    dead_lettered = CounterMetricFamily(
        "tidings_group_dead_lettered", "Events this process parked as dead letters.", labels=labels
    )
    dead_letters = GaugeMetricFamily(
        "tidings_group_dead_letters", "Dead letters of the group in the store now.", labels=labels
    )
    alive = GaugeMetricFamily(
        "tidings_group_alive",
        "1 while some runner (of any process) holds the group's lease, else 0.",
        labels=labels,
    )
    state = GaugeMetricFamily(
        "tidings_group_state",
        "1 for the state of this process's runner of the group, 0 for the others.",
        labels=[*labels, "state"],
    )
    for s in stats:
        key = [service, s.group]
        status = statuses.get(s.group)
        on_bus = s.group.endswith("@bus")
        if not on_bus:
            # The database's checkpoint, not the runner's: a standby's copy is stale.
            position = status.checkpoint if status is not None else s.checkpoint
            lag.add_metric(key, max(0, head - position))
            checkpoint.add_metric(key, position)
        handled.add_metric(key, s.handled)
        skipped.add_metric(key, s.skipped_duplicates)
        retries.add_metric(key, s.retries)
        dead_lettered.add_metric(key, s.dead_lettered)
        if s.group in dead:
            dead_letters.add_metric(key, dead[s.group])
        if on_bus:
            alive.add_metric(key, 1 if s.state == "live" else 0)
        else:
            alive.add_metric(key, 1 if status is not None and status.state in _ALIVE else 0)
        for value in RUNNER_STATES:
            state.add_metric([*key, value], 1 if s.state == value else 0)
    return [lag, checkpoint, handled, skipped, retries, dead_lettered, dead_letters, alive, state]


async def _relay_families(
    service: str, store: EventStore, relay: OutboxRelay, statuses: dict[str, GroupStatus]
) -> list[Metric]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    status = statuses.get(relay.group)
    position = status.checkpoint if status is not None else relay.checkpoint
    backlog = GaugeMetricFamily(
        "tidings_relay_backlog",
        "Events of the types the relay publishes that it has not passed yet.",
        labels=["service"],
    )
    backlog.add_metric([service], await _backlog(store, relay.event_types or (), position))
    published = CounterMetricFamily(
        "tidings_relay_published",
        "Events the relay got past: published (or left out by a translator, or parked).",
        labels=["service"],
    )
    published.add_metric([service], relay.relayed)
    return [backlog, published]


async def _backlog(store: EventStore, event_types: Sequence[str], after: int) -> int:
    if not event_types:
        return 0
    if isinstance(store, SQLStore):
        # Counted by the database, over the positions after the checkpoint (the primary key).
        marks = ", ".join("?" * len(event_types))
        rows = await store.query(
            f"SELECT count(*) FROM tidings_events WHERE position > ? AND event_type IN ({marks})",
            [after, *event_types],
        )
        return int(rows[0][0])
    return sum([1 async for _ in store.read_all_stored(after=after, event_types=event_types)])


async def _saga_family(service: str, store: SQLStore, sagas: list[str]) -> Metric:
    from prometheus_client.core import GaugeMetricFamily

    family = GaugeMetricFamily(
        "tidings_sagas",
        "Saga instances by saga and state, from the saga index.",
        labels=["service", "saga", "state"],
    )
    marks = ", ".join("?" * len(sagas))
    rows = await store.query(
        f"SELECT name, status, count(*) FROM tidings_sagas WHERE name IN ({marks}) GROUP BY name, status",
        sagas,
    )
    counts = {(str(saga), str(status)): int(n) for saga, status, n in rows}
    for saga in sagas:
        for status in STATUSES:
            family.add_metric([service, saga, status], counts.get((saga, status), 0))
    return family


class MetricsServer:
    """Serves ``GET /metrics`` of one service from the running event loop (a minimal HTTP/1.1
    server: one request per connection; ``HEAD`` too; other paths 404, other methods 405).

    A scrape that cannot read the store (it is closing, the database is away) gets a 503 with the
    error, at most :data:`SCRAPE_TIMEOUT` seconds after it asked, and the service goes on.
    """

    def __init__(self, service: Service, config: MetricsConfig) -> None:
        self.config = config
        self.metrics = ServiceMetrics(service)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on the configured address; raise :class:`MetricsError` if it cannot be bound."""
        host, port = self.config.host, self.config.port
        try:
            self._server = await asyncio.start_server(self._accept, host, port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise MetricsError(f"cannot serve metrics on {host}:{port}: {reason}") from exc

    @property
    def url(self) -> str:
        """``http://host:port/metrics`` with the port actually bound."""
        assert self._server is not None and self._server.sockets
        bound_host, bound_port = self._server.sockets[0].getsockname()[:2]
        host = f"[{bound_host}]" if ":" in bound_host else bound_host
        return f"http://{host}:{bound_port}/metrics"

    async def close(self) -> None:
        """Stop listening and drop connections in progress."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._respond(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # the client went away or sent garbage: nothing to answer
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with asyncio.timeout(_REQUEST_TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await _send(writer, 400, "Bad Request", b"malformed request line\n")
            return
        method, target = parts[0], parts[1]
        if target.split("?", 1)[0] != "/metrics":
            await _send(writer, 404, "Not Found", b"metrics are at /metrics\n")
            return
        if method not in ("GET", "HEAD"):
            await _send(writer, 405, "Method Not Allowed", b"use GET\n", extra=[("Allow", "GET, HEAD")])
            return
        try:
            try:
                async with asyncio.timeout(SCRAPE_TIMEOUT):
                    body = await self.metrics.render()
            except TimeoutError:
                raise StoreUnavailable(f"the store did not answer within {SCRAPE_TIMEOUT:g} s") from None
        except TidingsError as exc:  # the store is closing, or away: the next scrape may work
            log.warning("metrics of %r: cannot read them: %s", self.metrics.service.name, exc)
            await _send(writer, 503, "Service Unavailable", f"cannot read the metrics: {exc}\n".encode())
            return
        except Exception as exc:  # a bug: said to the scraper and logged, the service goes on
            log.exception("metrics of %r: reading them failed", self.metrics.service.name)
            await _send(writer, 500, "Internal Server Error", f"{type(exc).__name__}: {exc}\n".encode())
            return
        await _send(
            writer, 200, "OK", body, content_type=self.metrics.content_type, head_only=method == "HEAD"
        )


async def _send(
    writer: asyncio.StreamWriter,
    code: int,
    reason: str,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    extra: Sequence[tuple[str, str]] = (),
    head_only: bool = False,
) -> None:
    headers = [
        f"HTTP/1.1 {code} {reason}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in extra),
    ]
    writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("latin-1"))
    if not head_only:
        writer.write(body)
    await writer.drain()
