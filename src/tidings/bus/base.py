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
  redeliveries -- a message is not handled before the previous one of its partition was handled
  or dead-lettered;
* batches: a member takes up to :attr:`DeliveryPolicy.max_batch` messages of a partition at once
  (as many as are there, never waiting to fill a batch) and hands them, in order, to a
  :data:`BatchHandler` (:meth:`Bus.consume_batches`; :meth:`Bus.consume` calls a
  :data:`MessageHandler` per message of the batch); they are acknowledged together once the
  handler returned. A message that fails is retried alone, by the member that holds it, after its
  back-off (its ``attempt`` counts up); the messages after it in its partition wait for it, the
  ones before it are acknowledged;
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
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self, TypeVar

from tidings.bus.cloudevents import decode
from tidings.bus.errors import BusConfigError, UndecodableMessage
from tidings.bus.message import DeadLetter, IncomingMessage
from tidings.errors import is_permanent, is_transient
from tidings.events import Event, EventRegistry, RecordedEvent, default_registry

__all__ = [
    "BatchHandler",
    "BatchOutcome",
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


@dataclasses.dataclass(frozen=True, slots=True)
class BatchOutcome:
    """What a :data:`BatchHandler` did with a batch: ``messages[:done]`` are handled (they will be
    acknowledged); if ``error`` is set, ``messages[done]`` failed with it and none after it was
    handled (they come to the handler again once it is settled). ``error`` None with ``done``
    short of the batch means the handler stopped early (the rest come again)."""

    done: int
    error: BaseException | None = None


BatchHandler = Callable[[Sequence[IncomingMessage]], Awaitable[BatchOutcome]]
"""Handles messages of one partition in order; raising counts as the first message failing."""

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
    ``max_batch``: most messages of one partition a member takes and handles at once (a batch is
    never waited for: it holds what the partition had); 1 handles them one at a time.
    """

    max_deliver: int = 5
    backoff: tuple[float, ...] = (0.5, 2.0, 10.0)
    ack_wait: float = 30.0
    transient_backoff: float = 2.0
    max_batch: int = 100

    def __post_init__(self) -> None:
        if self.max_deliver < 1:
            raise BusConfigError(f"max_deliver must be >= 1, got {self.max_deliver}")
        if not self.backoff or any(b < 0 for b in self.backoff):
            raise BusConfigError(f"backoff must be a non-empty tuple of delays >= 0, got {self.backoff}")
        if self.ack_wait <= 0 or self.transient_backoff <= 0:
            raise BusConfigError("ack_wait and transient_backoff must be > 0")
        if not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= 10_000:
            raise BusConfigError(f"max_batch must be an int in 1..10000, got {self.max_batch!r}")

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
    DEAD = "dead"


@dataclasses.dataclass(frozen=True, slots=True)
class Delivery:
    """One message of a batch as the backend got it: its address, bytes and delivery count."""

    subject: str
    payload: bytes
    attempt: int


def one_at_a_time(handler: MessageHandler) -> BatchHandler:
    """A :data:`BatchHandler` that calls ``handler`` for each message in turn."""

    async def handle(messages: Sequence[IncomingMessage]) -> BatchOutcome:
        for index, message in enumerate(messages):
            try:
                await handler(message)
            except Exception as exc:
                return BatchOutcome(index, exc)
        return BatchOutcome(len(messages))

    return handle


async def handle_batch(
    *,
    group: ConsumerGroup,
    origin: str,
    deliveries: Sequence[Delivery],
    registry: EventRegistry,
    handler: BatchHandler,
    dead_letter: DeadLetterHandler,
    counters: Counters,
    stopping: asyncio.Event,
    keepalive: Callable[[int], Awaitable[None]] | None = None,
) -> list[Outcome]:
    """Run a batch of one partition through decoding, the handler and the retry policy; the same
    for every backend. Returns the outcome of each message of a prefix of ``deliveries`` (ACK, or
    DEAD: the dead-letter handler parked it; acknowledge both); the messages past that prefix are
    unsettled (the member is stopping) and must be delivered again.

    A message that cannot be decoded, has run out of deliveries or fails permanently is
    dead-lettered where it stands and its neighbours go on; one that fails otherwise is retried
    alone after its back-off, with ``attempt`` counting up, while the ones after it wait (order).
    A transient error is waited out without spending attempts. ``keepalive(i)`` tells the broker
    that messages ``i..`` are still being worked on.
    """
    policy = group.delivery
    outcomes: list[Outcome] = []
    attempts = [d.attempt for d in deliveries]
    decoded: list[IncomingMessage | UndecodableMessage] = []
    for d in deliveries:
        counters.delivered += 1
        if d.attempt > 1:
            counters.redelivered += 1
        try:
            decoded.append(decode(d.payload, registry, attempt=d.attempt))
        except UndecodableMessage as exc:
            decoded.append(exc)
    transient_wait = min(0.05, policy.transient_backoff)
    index = 0
    while index < len(deliveries):
        if stopping.is_set():
            return outcomes
        message = decoded[index]
        d = deliveries[index]
        attempt = attempts[index]
        if isinstance(message, UndecodableMessage):
            if not await _bury(group, origin, d.subject, d.payload, attempt, message.reason, None,
                               message, dead_letter, counters):  # fmt: skip
                await _pause(stopping, keepalive, index, policy.delay_after(attempt), policy.ack_wait)
                continue
            outcomes.append(Outcome.DEAD)
            index += 1
            continue
        if attempt > policy.max_deliver:
            # A member died or overran ack_wait on the last allowed delivery: nobody saw an outcome.
            reason = (
                f"delivered {attempt} times without an acknowledgement (max_deliver={policy.max_deliver})"
            )
            if not await _bury(group, origin, d.subject, d.payload, attempt, reason, message, None,
                               dead_letter, counters):  # fmt: skip
                await _pause(stopping, keepalive, index, policy.delay_after(attempt), policy.ack_wait)
                continue
            outcomes.append(Outcome.DEAD)
            index += 1
            continue
        # The run of decodable messages from here, up to the next one that needs burying.
        end = index
        run: list[IncomingMessage] = []
        while end < len(deliveries) and attempts[end] <= policy.max_deliver:
            item = decoded[end]
            if isinstance(item, UndecodableMessage):
                break
            run.append(
                item if item.attempt == attempts[end] else dataclasses.replace(item, attempt=attempts[end])
            )
            end += 1
        try:
            outcome = await _run_with_keepalive(handler(run), keepalive, index, policy.ack_wait)
        except Exception as exc:
            outcome = BatchOutcome(0, exc)
        done = max(0, min(outcome.done, len(run)))
        counters.acked += done
        outcomes.extend([Outcome.ACK] * done)
        index += done
        error = outcome.error
        if error is None:
            if done < len(run):
                return outcomes  # the handler stopped early: the rest comes again
            transient_wait = min(0.05, policy.transient_backoff)
            continue
        failed = run[done]
        if is_transient(error) and not stopping.is_set():
            # The surroundings failed (the consumer's store is locked): wait, retry, keep the attempt.
            log.warning("%s: transient error handling %s, retrying: %s", group.label, failed.event_id, error)
            await _pause(stopping, keepalive, index, transient_wait, policy.ack_wait)
            transient_wait = min(transient_wait * 2, policy.transient_backoff)
            continue
        if is_transient(error):
            return outcomes
        attempt = attempts[index]
        reason = f"{type(error).__qualname__}: {error}"
        if is_permanent(error) or attempt >= policy.max_deliver:
            d = deliveries[index]
            if await _bury(group, origin, d.subject, d.payload, attempt, reason, failed, error,
                           dead_letter, counters):  # fmt: skip
                outcomes.append(Outcome.DEAD)
                index += 1
                continue
            await _pause(stopping, keepalive, index, policy.delay_after(attempt), policy.ack_wait)
            continue
        log.info("%s: delivery %d of %s failed, retrying: %s", group.label, attempt, failed.event_id, reason)
        await _pause(stopping, keepalive, index, policy.delay_after(attempt), policy.ack_wait)
        attempts[index] = attempt + 1
        counters.delivered += 1
        counters.redelivered += 1
    return outcomes


async def _pause(
    stopping: asyncio.Event,
    keepalive: Callable[[int], Awaitable[None]] | None,
    index: int,
    seconds: float,
    ack_wait: float,
) -> None:
    """Wait ``seconds`` (less if stopping) while the broker is told messages ``index..`` are in hand."""
    await _run_with_keepalive(wait_or_stop(stopping, seconds), keepalive, index, ack_wait)
    if keepalive is not None:
        try:
            await keepalive(index)
        except Exception as exc:
            # Without it the broker redelivers after ack_wait; the inbox absorbs that.
            log.debug("keepalive failed: %r", exc)


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
) -> bool:
    """Park a message with the dead-letter handler; False if it could not be parked (it stays)."""
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
        log.exception("%s: the dead-letter handler failed; the message will be tried again", group.label)
        return False
    counters.dead_lettered += 1
    counters.acked += 1
    log.warning(
        "%s: dead-lettered a message from %s after %d deliveries: %s", group.label, origin, attempt, reason
    )
    return True


T = TypeVar("T")


async def _run_with_keepalive(
    work: Awaitable[T], keepalive: Callable[[int], Awaitable[None]] | None, index: int, ack_wait: float
) -> T:
    if keepalive is None:
        return await work

    async def beat() -> None:
        # Tell the broker the messages are still being worked on, well within ack_wait.
        while True:
            await asyncio.sleep(ack_wait / 3)
            try:
                await keepalive(index)
            except Exception as exc:
                log.debug("keepalive failed: %s", exc)

    beating = asyncio.create_task(beat())
    try:
        return await work
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

    async def consume(
        self,
        group: ConsumerGroup,
        handler: MessageHandler,
        dead_letter: DeadLetterHandler,
        *,
        registry: EventRegistry | None = None,
    ) -> Consumer:
        """Join ``group`` as a new member and start delivering its messages to ``handler``, one
        message at a time (taken from the broker in batches, see :meth:`consume_batches`).

        Creates the group's durable state on the broker if missing. Messages are decoded with
        ``registry`` (default: :data:`~tidings.events.default_registry`).
        """
        return await self.consume_batches(group, one_at_a_time(handler), dead_letter, registry=registry)

    @abstractmethod
    async def consume_batches(
        self,
        group: ConsumerGroup,
        handler: BatchHandler,
        dead_letter: DeadLetterHandler,
        *,
        registry: EventRegistry | None = None,
    ) -> Consumer:
        """Join ``group`` as a new member and deliver its messages to ``handler`` in batches: up to
        ``group.delivery.max_batch`` messages of one partition, in order, as many as the partition
        holds when the member asks (see :data:`BatchHandler` and :class:`BatchOutcome`). Handled
        messages are acknowledged together after the handler returns.
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
