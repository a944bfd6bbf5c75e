"""The outbox relay: a checkpointed subscription that publishes a service's integration events.

The service's store is its outbox. An integration event is appended in the same transaction as
the state change that caused it (by a handler's ``ctx.emit``), or is *translated* from a domain
event that was (``@service.translates``): either way the log holds it, atomically with the change,
before anything is published. The relay reads the log from its checkpoint, publishes each batch
and waits for the bus to store it, then commits the checkpoint. A relay that dies between the two
publishes the batch again; the bus drops what it already holds (same event ids: a translated
event's id is derived from its domain event's id), and consumers' inboxes absorb the rest. No
change commits without its event being published eventually, and nothing is published for a
change that rolled back.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence

from tidings import tracing
from tidings.bus.base import Bus
from tidings.commands import Command, destination_of
from tidings.errors import InvalidArgument, TidingsError, is_transient
from tidings.events import Event, RecordedEvent
from tidings.integration import IntegrationEvent
from tidings.processing.subscription import Subscription, SubscriptionConfig
from tidings.store.base import EventStore
from tidings.store.tracking import TrackingStore

__all__ = ["OutboxRelay", "Translator", "translated_id"]

log = logging.getLogger("tidings.bus.relay")

Translator = Callable[[Event, RecordedEvent], IntegrationEvent | None]
"""Maps a domain event (and its envelope) to the integration event to publish, or None to publish nothing."""

_NAMESPACE = uuid.UUID("1b0f1c4a-0b8e-4f7e-8d1c-2a6b5c1e9f10")


def command_types(store: EventStore) -> list[str]:
    """The type names of every command class the store's registry knows."""
    return [name for name, cls in store.registry.types().items() if issubclass(cls, Command)]


def translated_id(domain_event_id: uuid.UUID) -> uuid.UUID:
    """The id of the integration event translated from a domain event: the same on every relay run."""
    return uuid.uuid5(_NAMESPACE, str(domain_event_id))


class OutboxRelay(Subscription):
    """Publishes ``service``'s integration events from its store to ``bus``, in log order."""

    def __init__(
        self,
        store: TrackingStore,
        bus: Bus,
        service: str,
        *,
        published: Sequence[type[IntegrationEvent]],
        translators: Mapping[type[Event], Translator],
        config: SubscriptionConfig | None = None,
    ) -> None:
        types = {cls.__event_type__ for cls in published} | {cls.__event_type__ for cls in translators}
        types |= set(command_types(store))
        super().__init__(store, f"{service}.relay", event_types=sorted(types), config=config)
        self.bus = bus
        self.service = service
        self.published = tuple(published)
        self.translators = dict(translators)
        self.relayed = 0

    def route(self, recorded: RecordedEvent) -> tuple[str, RecordedEvent] | None:
        """Where and what to publish for one logged event: a command goes to its destination's
        subject space, an integration event (or a domain event's translation) to this service's;
        None if it is not for the bus."""
        event = recorded.event
        if isinstance(event, Command):
            destination = destination_of(event, recorded.metadata)
            if destination is None:
                raise InvalidArgument(
                    f"command {recorded.event_type} ({recorded.event_id}) names no destination: send it "
                    "from a saga step, with metadata={'destination': SERVICE}, or set __owner__"
                )
            return destination, recorded
        envelope = self.envelope(recorded)
        return None if envelope is None else (self.service, envelope)

    def envelope(self, recorded: RecordedEvent) -> RecordedEvent | None:
        """What this service publishes for one logged event: itself, its translation, or nothing."""
        event = recorded.event
        if isinstance(event, self.published):
            return recorded
        translate = next((fn for cls, fn in self.translators.items() if isinstance(event, cls)), None)
        if translate is None or not isinstance(event, Event):
            return None
        public = translate(event, recorded)
        if public is None:
            return None
        if not isinstance(public, IntegrationEvent):
            raise TidingsError(
                f"the translator of {type(event).__qualname__} returned {type(public).__qualname__}, "
                "not an IntegrationEvent"
            )
        metadata = {
            **recorded.metadata,
            "correlation_id": recorded.correlation_id or str(recorded.event_id),
            "causation_id": str(recorded.event_id),
        }
        return RecordedEvent(
            translated_id(recorded.event_id),
            type(public).__event_type__,
            recorded.stream_id,
            recorded.version,
            recorded.position,
            recorded.timestamp,
            public,
            metadata,
            type(public).__event_version__,
        )

    async def _publish(self, events: Sequence[RecordedEvent]) -> None:
        """Publish in log order, one bus call per run of messages for the same destination."""
        runs: list[tuple[str, list[RecordedEvent]]] = []
        for recorded in events:
            routed = self.route(recorded)
            if routed is None:
                continue
            destination, envelope = routed
            if runs and runs[-1][0] == destination:
                runs[-1][1].append(envelope)
            else:
                runs.append((destination, [envelope]))
        for destination, envelopes in runs:
            with tracing.publish_span(self.service, destination, envelopes):
                await self.bus.publish(destination, envelopes)

    async def process_batch(self, events: list[RecordedEvent], scanned_to: int) -> None:
        try:
            await self._publish(events)
        except TidingsError as exc:
            if is_transient(exc):
                raise  # the bus is away: the runner waits and publishes the batch again
            # The broker refused something in the batch: find it, park it, publish the rest.
            await self._publish_one_by_one(events)
        except Exception:
            await self._publish_one_by_one(events)
        self.relayed += len(events)
        self.handled += len(events)
        await self.commit_patiently(scanned_to)

    async def _publish_one_by_one(self, events: list[RecordedEvent]) -> None:
        """A batch failed for good: publish its events alone, and park the ones that cannot be."""
        for recorded in events:
            try:
                await self._publish([recorded])
            except TidingsError as exc:
                if is_transient(exc):
                    raise
                await self._park(recorded, exc)
            except Exception as exc:
                await self._park(recorded, exc)

    async def _park(self, recorded: RecordedEvent, exc: BaseException) -> None:
        log.error("relay of %r: cannot publish %s: %s", self.service, recorded.event_id, exc)
        # Everything before it was published: the checkpoint may pass it, parked.
        await self.commit_patiently(
            recorded.position, dead_letters=[self.dead_letter_record(recorded, exc, 1)]
        )
        self.dead_lettered += 1

    async def reprocess(self, recorded: RecordedEvent, dead_letter_id: int) -> bool:
        try:
            await self._publish([recorded])
        except Exception as exc:
            await self.commit(self.checkpoint, dead_letters=[self.dead_letter_record(recorded, exc, 1)])
            return False
        await self.commit(self.checkpoint, remove_dead_letter=dead_letter_id)
        return True
