"""Retry policy for failing handlers: bounded exponential backoff with jitter."""

from __future__ import annotations

import dataclasses
import random

from tidings.errors import InvalidArgument

__all__ = ["RetryPolicy"]


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
        if self.max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise InvalidArgument("delays must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise InvalidArgument(f"jitter must be within [0, 1], got {self.jitter}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)
