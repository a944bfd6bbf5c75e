"""Retrying failed events: the backoff policy and the one retry -> dead-letter engine.

Handlers and projections fail the same way and are retried the same way (:func:`retry_event`):

* a *transient* error (:func:`~tidings.errors.is_transient`: the store is locked or away) is
  waited out with a growing pause, and does not spend the event's attempts;
* a *permanent* error (:func:`~tidings.errors.is_permanent`: an invalid stream id, an event that
  cannot be serialised, SQL that does not parse) dead-letters the event at once;
* anything else is retried per :class:`RetryPolicy`, then dead-lettered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

from tidings.errors import CheckpointConflict, InvalidArgument, is_permanent, is_transient

__all__ = ["RetryPolicy", "handler_failure", "retry_event"]


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a failing event is retried before it is dead-lettered.

    Attempt ``n`` (1-based) that fails waits ``min(max_delay, initial_delay * multiplier**(n-1))``,
    scaled by a random factor in ``[1 - jitter, 1 + jitter]`` so that many consumers failing at
    once do not retry in lockstep. After ``max_attempts`` attempts the event is dead-lettered.
    """

    max_attempts: int = 5
    initial_delay: float = 0.05
    max_delay: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise InvalidArgument("delays must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise InvalidArgument(f"jitter must be within [0, 1], got {self.jitter}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)


def handler_failure(exc: BaseException) -> bool:
    """True if ``exc``, raised by user code, is that code's failure rather than our own shutdown.

    A handler that lets :class:`asyncio.CancelledError` escape while nobody cancels its task (it
    awaited something that was cancelled) has failed like any other; only a cancellation of the
    runner's own task must propagate.
    """
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is None or task.cancelling() == 0
    return isinstance(exc, Exception)


class Waiter(Protocol):
    """What :func:`retry_event` needs from its subscription: pauses that a stop cuts short,
    the growing pause for outages, and the counters it reports."""

    retries: int
    dead_lettered: int
    last_error: str | None

    @property
    def stopping(self) -> bool: ...

    async def pause(self, seconds: float) -> None: ...

    def outage_delay(self, outages: int) -> float: ...


async def retry_event(
    runner: Waiter,
    policy: RetryPolicy,
    first_error: BaseException | None,
    attempt: Callable[[int], Awaitable[None]],
    park: Callable[[BaseException, int], Awaitable[None]],
) -> bool | None:
    """Retry one event that failed with ``first_error`` until it succeeds or is dead-lettered.

    With ``first_error`` None the event has not failed yet (its effects were refused for reasons
    of other events, say): the first attempt runs at once and counts as attempt 1.

    ``attempt(n)`` processes the event once, commit included, and raises on failure; ``park(error,
    attempts)`` dead-letters it (committing the checkpoint past it). Returns True if an attempt
    succeeded, False if the event was parked, None if the runner was asked to stop while waiting:
    then nothing was committed and the event is delivered again after the restart.
    :class:`~tidings.CheckpointConflict` (another runner of the group) propagates.
    """
    number = 1
    outages = 0
    if first_error is None:
        try:
            await attempt(number)
            return True
        except CheckpointConflict:
            raise
        except BaseException as exc:
            if not handler_failure(exc):
                raise
            first_error = exc
    error: BaseException = first_error
    while True:
        runner.last_error = f"{type(error).__name__}: {error}"
        if is_transient(error):
            outages += 1
            await runner.pause(runner.outage_delay(outages))
        elif is_permanent(error) or number >= policy.max_attempts:
            await park(error, number)
            runner.dead_lettered += 1
            return False
        else:
            runner.retries += 1
            await runner.pause(policy.delay(number))
            number += 1
        if runner.stopping:
            return None
        try:
            await attempt(number)
        except CheckpointConflict:
            raise
        except BaseException as exc:
            if not handler_failure(exc):
                raise
            error = exc
            continue
        return True
