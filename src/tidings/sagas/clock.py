"""Time for sagas' deadlines: the system clock, or a manual one that tests move by hand."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """Wall-clock seconds since the epoch, and a way to wait for an instant."""

    def now(self) -> float:
        """The current instant, in seconds since the epoch."""
        ...

    async def sleep_until(self, instant: float) -> None:
        """Return once :meth:`now` has reached ``instant`` (may return early; callers re-check)."""
        ...


class SystemClock:
    """The real clock (``time.time``)."""

    def now(self) -> float:
        return time.time()

    async def sleep_until(self, instant: float) -> None:
        await asyncio.sleep(max(0.0, instant - time.time()))


class ManualClock:
    """A clock that only moves when told to: deadlines fire in tests without real waiting.

    ``await clock.advance(30)`` moves time forward and wakes every sleeper whose instant passed.
    """

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = float(start)
        self._moved = asyncio.Event()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, instant: float) -> None:
        while self._now < instant:
            moved = self._moved
            await moved.wait()

    async def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` and let the woken sleepers run."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._now += seconds
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()
        await asyncio.sleep(0)
