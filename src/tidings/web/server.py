"""The console's uvicorn server: uvicorn's, plus ending the live tails when asked to stop.

uvicorn stops gracefully by waiting for open responses to finish, then cancels what is left;
a live tail never finishes on its own, so without this every open tail would be cut off
mid-response (with a traceback per tail). :class:`ConsoleServer` sets
:attr:`~tidings.web.app.Console.stopping` as soon as a stop is requested, and the tails end.
"""

from __future__ import annotations

import asyncio
import socket
from types import FrameType

import uvicorn

from tidings.web.app import Console

__all__ = ["ConsoleServer"]


class ConsoleServer(uvicorn.Server):
    """A uvicorn server for the console ``console`` (``tidings serve`` runs it)."""

    def __init__(self, config: uvicorn.Config, console: Console) -> None:
        super().__init__(config)
        self.console = console
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Called from a signal handler: hand the event to the loop rather than set it here.
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.console.stopping.set)
        super().handle_exit(sig, frame)
