"""A live console: uvicorn serving an application in a thread of its own, on a free port."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

import uvicorn

from tidings.testing.servers import free_port

T = TypeVar("T")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion in a thread of its own: Playwright's sync API keeps an event
    loop running in the test's thread, where ``asyncio.run`` is refused."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class LiveServer:
    """``with LiveServer(app) as server:`` serves ``app`` at ``server.url`` until the block ends.

    Startup failures (the lifespan could not open the store) raise here. Tests may hang extra
    attributes on it (the seeded facts, a switch of the test system).
    """

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=1
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="console-uvicorn", daemon=True)
        self.switch: Any = None
        self.seeded: Any = None
        self.store_url = ""

    def __enter__(self) -> LiveServer:
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                raise RuntimeError("the console's uvicorn stopped while starting (see its log above)")
            self.thread.join(0.05)
        raise RuntimeError("the console's uvicorn did not start within 30 s")

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.server.should_exit = True
        self.thread.join(30)
