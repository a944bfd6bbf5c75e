"""The bus between services: the protocol every backend implements, and what they share.

A **publishing service** publishes integration events (:class:`~tidings.events.RecordedEvent`
envelopes read from its own store, the outbox) with :meth:`Bus.publish`. Publishing is idempotent
per event id: the bus drops a re-publish of an id it already holds (for NATS within the stream's
de-duplication window, see :mod:`tidings.bus.nats`); consumers still de-duplicate beyond it through
their inbox.

A **consumer group** (:class:`ConsumerGroup`) of a consuming service reads chosen event types of
one or more publishing services. Every instance that calls :meth:`Bus.consume` with the same group
is a member of it; the group's partitions are shared among its live members. Guarantees:

* at-least-once: a message is acknowledged only after the handler returned; a handler that raises
  makes the message come back after a back-off (redelivery), so handlers must be idempotent (the
  consuming service's inbox makes their effects exactly-once);
* order per aggregate: messages of one stream id (the CloudEvent ``subject``) of one publishing
  service reach the group's handler in publishing order, one at a time, also across members and
  redeliveries -- a message is not delivered before the previous one of its partition was acked or
  dead-lettered;
* dead letters: after :attr:`DeliveryPolicy.max_deliver` failed deliveries, or at once for a
  message that cannot be decoded (:class:`~tidings.bus.errors.UndecodableMessage`) or whose handler
  raised a permanent error, the dead-letter callback receives a :class:`DeadLetter` with the reason
  and the message is acked: it never blocks its partition for longer than its retries;
* transient errors (:func:`tidings.errors.is_transient`, e.g. the consumer's store is locked) are
  waited out and retried without spending the message's deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import logging
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Self

from tidings.bus.cloudevents import decode
from tidings.bus.errors import BusConfigError, UndecodableMessage
from tidings.bus.message import DeadLetter, IncomingMessage
from tidings.errors import is_permanent, is_transient
from tidings.events import Event, EventRegistry, RecordedEvent, default_registry

__all__ = [
    "Bus",
    "BusStatistics",
    "Consumer",
    "ConsumerGroup",
    "ConsumerStatistics",
    "DeadLetterHandler",
    "DeliveryPolicy",
    "MessageHandler",
    "PublishResult",
    "SetupAction",
    "partition_of",
]

log = logging.getLogger("tidings.bus")

MessageHandler = Callable[[IncomingMessage], Awaitable[None]]
"""Handles one message; returning acknowledges it, raising makes it come back (or dead-letters it)."""

DeadLetterHandler = Callable[[DeadLetter], Awaitable[None]]
"""Parks a message the bus gave up on; if it raises, the message is retried later, never lost."""

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TYPE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def check_name(kind: str, value: str) -> str:
    """``value`` if it is a valid service or group name (it becomes a subject token and a stream name)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise BusConfigError(f"{kind} name {value!r} must be 1-64 characters of A-Z, a-z, 0-9, '_' and '-'")
    return value


def check_event_type(value: str) -> str:
    """``value`` if an event type name can be part of a subject (dot-separated tokens of [A-Za-z0-9_-])."""
    if not isinstance(value, str) or len(value) > 200 or not _TYPE.fullmatch(value):
        raise BusConfigError(
            f"event type {value!r} cannot be published on the bus: use dot-separated tokens "
            "of A-Z, a-z, 0-9, '_' and '-' (set __event_type__)"
        )
    return value


def partition_of(stream_id: str, partitions: int) -> int:
    """The partition (``0 <= p < partitions``) of a stream id: a stable hash, the same in every process."""
    digest = hashlib.blake2b(stream_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How a consumer group retries.

    ``max_deliver``: deliveries of one message before it is dead-lettered (>= 1).
    ``backoff``: seconds before redelivery after the n-th failed delivery (the last value repeats).
    ``ack_wait``: seconds the broker waits for an acknowledgement before it redelivers the message to
    any member (a member that died, or was stopped, mid-handler); a live member extends it while its
    handler runs, so it bounds failover, not handler duration.
    ``transient_backoff``: longest wait between local retries of a transient error.
    """

    max_deliver: int = 5
    backoff: tuple[float, ...] = (0.5, 2.0, 10.0)
    ack_wait: float = 30.0
    transient_backoff: float = 2.0

    def __post_init__(self) -> None:
        if self.max_deliver < 1:
            raise BusConfigError(f"max_deliver must be >= 1, got {self.max_deliver}")
        if not self.backoff or any(b < 0 for b in self.backoff):
            raise BusConfigError(f"backoff must be a non-empty tuple of delays >= 0, got {self.backoff}")
        if self.ack_wait <= 0 or self.transient_backoff <= 0:
            raise BusConfigError("ack_wait and transient_backoff must be > 0")

    def delay_after(self, attempt: int) -> float:
        """Seconds before the redelivery that follows failed delivery number ``attempt``."""
        return self.backoff[min(attempt, len(self.backoff)) - 1]


@dataclasses.dataclass(frozen=True)
class ConsumerGroup:
    """A durable consumer group: ``name`` of consuming ``service`` over ``sources``.

    ``sources`` maps a publishing service to the event types (names or classes) the group reads
    from it; an empty set means every type that service publishes.
    """

    service: str
    name: str
    sources: Mapping[str, frozenset[str]]
    delivery: DeliveryPolicy = DeliveryPolicy()

    def __init__(
        self,
        service: str,
        name: str,
        sources: Mapping[str, Iterable[str | type[Event]]],
        delivery: DeliveryPolicy | None = None,
    ) -> None:
        if not sources:
            raise BusConfigError(f"consumer group {name!r} reads from no publishing service")
        normal = {
            check_name("publishing service", src): frozenset(
                check_event_type(t if isinstance(t, str) else t.__event_type__) for t in types
            )
            for src, types in sources.items()
        }
        object.__setattr__(self, "service", check_name("service", service))
        object.__setattr__(self, "name", check_name("consumer group", name))
        object.__setattr__(self, "sources", normal)
        object.__setattr__(self, "delivery", delivery if delivery is not None else DeliveryPolicy())

    @property
    def label(self) -> str:
        return f"{self.service}/{self.name}"

    def __hash__(self) -> int:
        return hash((self.service, self.name))

    def accepts(self, source: str, event_type: str) -> bool:
        types = self.sources.get(source)
        return types is not None and (not types or event_type in types)


@dataclasses.dataclass(frozen=True, slots=True)
class SetupAction:
    """One thing :meth:`Bus.setup` created or checked on the broker.

    ``kind`` is ``"stream"`` or ``"consumer"``; ``action`` is ``"created"``, ``"updated"`` or
    ``"unchanged"``; ``detail`` says what it is (partitions, replicas, filters).
    """

    kind: str
    name: str
    action: str
    detail: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class PublishResult:
    """What one :meth:`Bus.publish` did: messages stored, and re-publishes the bus dropped."""

    published: int
    duplicates: int


@dataclasses.dataclass(frozen=True, slots=True)
class ConsumerStatistics:
    """One member's counters. ``partitions`` are the ``(publishing service, partition)`` it holds now."""

    group: str
    member: str
    delivered: int
    acked: int
    redelivered: int
    dead_lettered: int
    partitions: tuple[tuple[str, int], ...]


@dataclasses.dataclass(frozen=True, slots=True)
class BusStatistics:
    """A bus's counters as data, since it was opened in this process.

    ``delivered`` counts deliveries (a redelivery counts again, and also in ``redelivered``);
    ``pending`` is the number of messages the broker holds for this process's consumer groups that
    are not acknowledged yet (``None`` when the broker could not be asked).
    """

    published: int
    duplicates: int
    delivered: int
    acked: int
    redelivered: int
    dead_lettered: int
    pending: int | None
    consumers: tuple[ConsumerStatistics, ...] = ()


@dataclasses.dataclass(slots=True)
class Counters:
    """Mutable counters behind the statistics (single event loop: no locking needed)."""

    delivered: int = 0
    acked: int = 0
    redelivered: int = 0
    dead_lettered: int = 0


class Outcome(enum.Enum):
    ACK = "ack"
    RETRY = "retry"
    DEAD = "dead"


async def handle_delivery(
    *,
    group: ConsumerGroup,
    origin: str,
    subject: str,
    payload: bytes,
    attempt: int,
    registry: EventRegistry,
    handler: MessageHandler,
    dead_letter: DeadLetterHandler,
    counters: Counters,
    stopping: asyncio.Event,
    keepalive: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Outcome, float]:
    """Run one delivery through decoding, the handler and the retry policy; the same for every backend.

    Returns what the backend must do with the message: ACK it, RETRY it after the returned delay
    (a nak), or acknowledge it as DEAD (the dead-letter handler has parked it).
    """
    policy = group.delivery
    counters.delivered += 1
    if attempt > 1:
        counters.redelivered += 1
    try:
        message = decode(payload, registry, attempt=attempt)
    except UndecodableMessage as exc:
        return await _bury(
            group, origin, subject, payload, attempt, exc.reason, None, exc, dead_letter, counters
        )
    if attempt > policy.max_deliver:
        # A member died or overran ack_wait on the last allowed delivery: nobody saw an outcome.
        reason = f"delivered {attempt} times without an acknowledgement (max_deliver={policy.max_deliver})"
        return await _bury(
            group, origin, subject, payload, attempt, reason, message, None, dead_letter, counters
        )
    transient_wait = min(0.05, policy.transient_backoff)
    while True:
        try:
            await _run_with_keepalive(handler(message), keepalive, policy.ack_wait)
        except Exception as exc:
            if is_transient(exc) and not stopping.is_set():
                # The surroundings failed (the consumer's store is locked): wait, retry, keep the attempt.
                log.warning(
                    "%s: transient error handling %s, retrying: %s", group.label, message.event_id, exc
                )
                await wait_or_stop(stopping, transient_wait)
                transient_wait = min(transient_wait * 2, policy.transient_backoff)
                if keepalive is not None:
                    try:
                        await keepalive()
                    except Exception as beat_error:
                        # Without it the broker redelivers after ack_wait; the inbox absorbs that.
                        log.debug("%s: keepalive failed: %r", group.label, beat_error)
                continue
            if is_transient(exc):
                return Outcome.RETRY, 0.0
            reason = f"{type(exc).__qualname__}: {exc}"
            if is_permanent(exc) or attempt >= policy.max_deliver:
                return await _bury(
                    group, origin, subject, payload, attempt, reason, message, exc, dead_letter, counters
                )
            log.info(
                "%s: delivery %d of %s failed, retrying: %s", group.label, attempt, message.event_id, reason
            )
            return Outcome.RETRY, policy.delay_after(attempt)
        counters.acked += 1
        return Outcome.ACK, 0.0


async def _bury(
    group: ConsumerGroup,
    origin: str,
    subject: str,
    payload: bytes,
    attempt: int,
    reason: str,
    message: IncomingMessage | None,
    error: BaseException | None,
    dead_letter: DeadLetterHandler,
    counters: Counters,
) -> tuple[Outcome, float]:
    letter = DeadLetter(
        group=group.label,
        origin=origin,
        subject=subject,
        payload=payload,
        reason=reason,
        attempts=attempt,
        message=message,
        error=error,
    )
    try:
        await dead_letter(letter)
    except Exception:
        # Never lose a message: if it cannot be parked, it stays on the bus and comes back.
        log.exception("%s: the dead-letter handler failed; the message will be redelivered", group.label)
        return Outcome.RETRY, group.delivery.delay_after(attempt)
    counters.dead_lettered += 1
    counters.acked += 1
    log.warning(
        "%s: dead-lettered a message from %s after %d deliveries: %s", group.label, origin, attempt, reason
    )
    return Outcome.DEAD, 0.0


async def _run_with_keepalive(
    work: Awaitable[None], keepalive: Callable[[], Awaitable[None]] | None, ack_wait: float
) -> None:
    if keepalive is None:
        await work
        return

    async def beat() -> None:
        # Tell the broker the message is still being worked on, well within ack_wait.
        while True:
            await asyncio.sleep(ack_wait / 3)
            try:
                await keepalive()
            except Exception as exc:
                log.debug("keepalive failed: %s", exc)

    beating = asyncio.create_task(beat())
    try:
        await work
    finally:
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating


async def wait_or_stop(event: asyncio.Event, timeout: float) -> None:
    """Wait ``timeout`` seconds, or less if ``event`` is set (a stop request)."""
    if timeout <= 0 or event.is_set():
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout)


class Consumer(ABC):
    """One member of a consumer group, started by :meth:`Bus.consume`. Stop it with :meth:`stop`."""

    group: ConsumerGroup
    member: str

    @abstractmethod
    async def stop(self) -> None:
        """Stop taking messages, let the handler finish the one in hand, and leave the group
        (its partitions go to the other members at once). Idempotent."""

    @abstractmethod
    def statistics(self) -> ConsumerStatistics:
        """This member's counters and the partitions it holds."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class Bus(ABC):
    """An event bus between services, chosen by URL with :func:`tidings.bus.open_bus`.

    Use as an async context manager (or call :meth:`open` and :meth:`close`).
    """

    url: str

    @abstractmethod
    async def open(self) -> Self:
        """Connect; raises :class:`~tidings.bus.errors.BusUnavailable` if the broker is unreachable."""

    @abstractmethod
    async def close(self) -> None:
        """Stop this bus's consumers (letting in-hand messages finish) and disconnect. Idempotent."""

    @abstractmethod
    async def publish(self, service: str, envelopes: Iterable[RecordedEvent]) -> PublishResult:
        """Publish ``envelopes`` as integration events of ``service``, in order, and return once the
        broker has stored every one (durably, for NATS: acked by the stream).

        Idempotent per event id: re-publishing an id the bus holds stores nothing and counts as a
        duplicate. Raises :class:`~tidings.bus.errors.BusUnavailable` (transient: publish again)
        or :class:`~tidings.errors.SerializationError` / :class:`~tidings.bus.errors.BusConfigError`
        (permanent). After an error, a prefix of the envelopes may have been stored.
        """

    @abstractmethod
    async def publish_raw(
        self, service: str, event_type: str, key: str, payload: bytes, *, msg_id: str | None = None
    ) -> bool:
        """Publish pre-encoded bytes (e.g. a CloudEvent made by another SDK) as ``service``'s message
        of ``event_type`` in the partition of stream id ``key``. Returns False if ``msg_id`` was
        already held (a duplicate). The bytes are not checked: consumers dead-letter bad ones."""

    @abstractmethod
    async def consume(
        self,
        group: ConsumerGroup,
        handler: MessageHandler,
        dead_letter: DeadLetterHandler,
        *,
        registry: EventRegistry | None = None,
    ) -> Consumer:
        """Join ``group`` as a new member and start delivering its messages to ``handler``.

        Creates the group's durable state on the broker if missing. Messages are decoded with
        ``registry`` (default: :data:`~tidings.events.default_registry`).
        """

    @abstractmethod
    async def statistics(self) -> BusStatistics:
        """The bus's counters and its consumers' statistics, as data."""

    @abstractmethod
    async def setup(
        self, publishing: Iterable[str] = (), groups: Iterable[ConsumerGroup] = ()
    ) -> list[SetupAction]:
        """Create or check what the ``publishing`` services and consumer ``groups`` need on the broker
        (streams, durable consumers), and say what was done. Idempotent; what ``tidings bus setup``
        and a service's start-up run. Raises :class:`~tidings.bus.errors.BusConfigError` if what the
        broker holds contradicts the configuration in a way that cannot be changed in place (the
        partition count of a stream), :class:`~tidings.bus.errors.BusUnavailable` if it is unreachable.
        """

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def registry_or_default(registry: EventRegistry | None) -> EventRegistry:
    return registry if registry is not None else default_registry
