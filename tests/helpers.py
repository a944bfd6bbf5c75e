"""Helpers shared by the whole suite.

:func:`wait_until` is the one way a test waits for something to happen that it cannot be told
about (no event, no ``wait_for``): it checks a condition until it holds, within a bounded time, and
fails with a message saying what never happened. Tests never synchronise with a bare ``sleep``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from tidings import EventStore

T = TypeVar("T")

POLL = 0.01
"""Seconds between two checks of a condition: short, so a test goes on as soon as it holds."""


async def wait_until(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 30.0,
    what: str | Callable[[], str] = "the condition",
) -> T:
    """Return the first truthy value of ``predicate()`` (a plain or an async function).

    Checks it every :data:`POLL` seconds; after ``timeout`` seconds fails the test with
    ``what`` (a string, or a function called at that moment to describe the state).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if loop.time() >= deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {described}")
        await asyncio.sleep(POLL)  # polling the condition, not synchronising on time


async def blocked_wait_for_append(store: EventStore, after: int) -> asyncio.Task[int]:
    """Start ``store.wait_for_append(after)`` and return its task once it has read the head and
    is waiting for a wake-up -- so that an append made now can only reach it by a wake-up
    (a notification or a poll), not by its first look at the head.

    Observes the store's head query for that (a test of change notification needs to know).
    """
    looked = asyncio.Event()
    read_head = store._head

    async def observed() -> int:
        try:
            return await read_head()
        finally:
            looked.set()

    store._head = observed  # type: ignore[method-assign]
    try:
        task = asyncio.create_task(store.wait_for_append(after, timeout=None))
        # wait_for_append goes from reading the head to waiting without yielding to the loop.
        await asyncio.wait_for(looked.wait(), 30)
    finally:
        del store._head  # the class's method again
    assert not task.done(), f"the head was already past {after}: {task.result()}"
    return task
