"""Orders' query API over HTTP, for the multi-process mode: a tiny stdlib server and client.

``GET /orders/<order id>`` answers ``200`` with the order's details as JSON, or ``404``. One
request per connection, no keep-alive: this is the smallest thing that is honestly HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import urllib.error
import urllib.request

import orjson

from .emails import OrdersUnavailable
from .orders import OrderDetails, OrderQueries

__all__ = ["HttpOrderDetails", "serve_order_queries"]


async def serve_order_queries(queries: OrderQueries, host: str, port: int) -> asyncio.Server:
    """Start serving ``queries`` on ``host:port``; close the returned server to stop."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            method, path, *_ = request.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            status, body = await _answer(queries, method, path)
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)


async def _answer(queries: OrderQueries, method: str, path: str) -> tuple[str, bytes]:
    if method != "GET" or not path.startswith("/orders/"):
        return "404 Not Found", b'{"error": "not found"}'
    details = await queries.details(path.removeprefix("/orders/"))
    if details is None:
        return "404 Not Found", b'{"error": "no such order"}'
    return "200 OK", orjson.dumps(details.as_dict())


class HttpOrderDetails:
    """Email's client of Orders' query API over HTTP."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    async def details(self, order_id: str) -> OrderDetails | None:
        return await asyncio.to_thread(self._get, order_id)

    def _get(self, order_id: str) -> OrderDetails | None:
        try:
            with urllib.request.urlopen(f"{self.base_url}/orders/{order_id}", timeout=self.timeout) as answer:
                data = orjson.loads(answer.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise OrdersUnavailable(f"Orders' query API answered {exc.code}") from exc
        except OSError as exc:  # refused, reset, timed out: Orders is restarting
            raise OrdersUnavailable(f"Orders' query API is unreachable: {exc}") from exc
        return OrderDetails(**data)
