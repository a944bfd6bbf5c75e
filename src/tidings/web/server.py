"""The console's uvicorn server: uvicorn's, plus opening the stores first and ending the live
tails when asked to stop.

The stores are opened before the server listens, so a store that cannot be opened (a database
that does not answer) is reported as :attr:`ConsoleServer.failure` instead of failing the
application's startup with a traceback. uvicorn stops gracefully by waiting for open responses
to finish, then cancels what is left; a live tail never finishes on its own, so
:class:`ConsoleServer` sets :attr:`~tidings.web.app.Console.stopping` as soon as a stop is
requested, and the tails end.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn

from tidings.errors import TidingsError
from tidings.web.app import Console

__all__ = ["ConsoleServer"]


class ConsoleServer(uvicorn.Server):
    """A uvicorn server for the console ``console`` (``tidings serve`` runs it).

    ``ready`` is called once the stores are open, before the server listens. If a store cannot
    be opened, :meth:`run` returns without serving and :attr:`failure` holds the error.
    """

    def __init__(self, config: uvicorn.Config, console: Console, ready: Callable[[], None]) -> None:
        super().__init__(config)
        self.console = console
        self.ready = ready
        self.failure: TidingsError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        stores = {id(s): s for s in (self.console.store, *self.console.sources.values())}.values()
        opened = []
        try:
            try:
                for store in stores:
                    if not store.is_open:
                        await store.open()
                        opened.append(store)
            except TidingsError as exc:
                self.failure = exc
                return
            self.ready()
            await super().serve(sockets)
        finally:
            for store in opened:
                await store.close()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Called from a signal handler: hand the event to the loop rather than set it here.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.console.stopping.set)
        super().handle_exit(sig, frame)
