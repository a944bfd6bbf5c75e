"""One shop service as its own OS process.

``python -m tidings.demo.shop.worker SERVICE --store URL --bus URL [options]``

Builds the service with :func:`~.system.build_service`, creates its tables, runs it until SIGTERM
(then stops gracefully) and writes its counters to ``--stats``. Orders also serves its query API
over HTTP (``--listen PORT``); Email asks it there (``--orders-api URL``). ``--ready PATH`` is
created once the service runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from pathlib import Path

import orjson

from tidings.bus import open_bus

from .duplicates import DuplicatingBus
from .orders import OrderQueries
from .orders_api import HttpOrderDetails, serve_order_queries
from .system import build_service, prepare_store
from .wiring import SERVICES, VARIANTS, Wiring

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tidings.demo.shop.worker", description=__doc__)
    p.add_argument("service", choices=SERVICES)
    p.add_argument("--store", required=True, help="the service's store URL")
    p.add_argument("--bus", required=True, help="the bus URL (nats://...)")
    p.add_argument("--variant", choices=VARIANTS, default="saga")
    p.add_argument("--payment-timeout", type=float, default=0.5)
    p.add_argument("--slow-latency", type=float, default=1.0)
    p.add_argument("--ack-wait", type=float, default=5.0)
    p.add_argument("--duplicate-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--mailbox", type=Path, help="the fake mail provider's file (email)")
    p.add_argument("--orders-api", help="Orders' query API base URL (email)")
    p.add_argument("--listen", type=int, help="port to serve Orders' query API on (orders)")
    p.add_argument("--ready", type=Path, help="file to create once the service runs")
    p.add_argument("--stats", type=Path, help="file to write the counters to on a graceful stop")
    return p


async def serve(args: argparse.Namespace) -> None:
    wiring = Wiring(
        variant=args.variant,
        payment_timeout=args.payment_timeout,
        slow_latency=args.slow_latency,
        ack_wait=args.ack_wait,
    )
    async with open_bus(args.bus) as inner:
        bus = DuplicatingBus(inner, args.duplicate_rate, args.seed * 1000 + os.getpid())
        details = HttpOrderDetails(args.orders_api) if args.orders_api else None
        service = build_service(
            args.service, args.store, bus, wiring, order_details=details, mailbox=args.mailbox
        )
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(service)
            await prepare_store(args.service, service.store)
            if args.service == "orders" and args.listen:
                server = await serve_order_queries(OrderQueries(service.store), "127.0.0.1", args.listen)
                stack.push_async_callback(_close_server, server)

            @service.on_start
            async def announce() -> None:
                if args.ready is not None:
                    args.ready.write_text(str(os.getpid()))

            await service.serve()
        if args.stats is not None:
            stats = {"injected": bus.injected, "absorbed": service.duplicates_skipped, "pid": os.getpid()}
            args.stats.write_bytes(orjson.dumps(stats))


async def _close_server(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(serve(parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
