"""What every service of the shop is built with: the variant, the failure knobs, the runner tuning."""

from __future__ import annotations

import dataclasses
from typing import Literal

from tidings.errors import InvalidArgument
from tidings.processing.retry import RetryPolicy
from tidings.processing.subscription import SubscriptionConfig

__all__ = ["SERVICES", "VARIANTS", "Variant", "Wiring"]

Variant = Literal["choreography", "saga"]
VARIANTS: tuple[Variant, ...] = ("choreography", "saga")

SERVICES = ("customers", "orders", "inventory", "payments", "shipping", "email")
"""Every service of the shop, in the order they are started."""


def _subscription() -> SubscriptionConfig:
    # Many attempts with short delays: an aggregate saved by two deliveries at once (two orders of
    # one SKU in two bus partitions, or two Inventory processes) is a ConcurrencyError that costs
    # an attempt; it always succeeds on a later one, and must never end in the dead letters.
    return SubscriptionConfig(
        batch_size=500,
        poll_interval=0.05,
        retry=RetryPolicy(max_attempts=50, initial_delay=0.005, max_delay=0.25),
        failure_backoff=0.5,
    )


@dataclasses.dataclass(frozen=True)
class Wiring:
    """How a shop service is wired: which variant of the checkout, and how its payments behave.

    ``payment_timeout`` is the saga's deadline for an authorization (and, in the choreography,
    the time Payments itself gives the provider); ``slow_latency`` is how long the slow payment
    provider takes for a "slow" card -- longer than the timeout, so it always trips it.
    ``ack_wait`` bounds how long a bus message in the hands of a killed process waits to be
    redelivered (NATS).
    """

    variant: Variant = "saga"
    payment_timeout: float = 0.5
    slow_latency: float = 1.0
    ack_wait: float = 5.0
    subscription: SubscriptionConfig = dataclasses.field(default_factory=_subscription)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise InvalidArgument(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.payment_timeout <= 0 or self.slow_latency <= self.payment_timeout:
            raise InvalidArgument(
                "need 0 < payment_timeout < slow_latency (a slow payment trips the deadline)"
            )
