"""Running sagas: the handler that moves instances forward, and the timer that fires deadlines.

A saga runs as one checkpointed handler group of its service (``saga:<name>``). For each event it
loads the instance through the handler context, records the transition, and saves it together
with the commands it sends and a row of the ``tidings_sagas`` index, all in the group's commit:
a saga step happens exactly once, and a duplicated or replayed event finds the instance already
past it and changes nothing.

Deadlines are durable: a step's deadline is stored in the index with the transition that starts
the step. The :class:`DeadlineTimer` of each running service reads the index, and when a deadline
passes it appends a :class:`DeadlinePassed` event (with an id derived from the saga, step and
deadline, so that timers of several processes, or one that restarts, append it once). The saga's
handler then takes the failure path if the step is still waiting for that deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from tidings import tracing
from tidings.errors import InvalidArgument, TidingsError, is_transient
from tidings.events import Event
from tidings.processing.context import HandlerContext
from tidings.sagas.clock import Clock
from tidings.sagas.definition import Saga, Step
from tidings.sagas.state import (
    CompensationDone,
    CompensationStarted,
    DeadlinePassed,
    SagaCompensated,
    SagaCompleted,
    SagaFailed,
    SagaInstance,
    SagaStarted,
    StepFailed,
    StepStarted,
    StepSucceeded,
)
from tidings.store.tracking import SQLStore

__all__ = ["DeadlineTimer", "SagaHandler", "ensure_saga_index"]

log = logging.getLogger("tidings.sagas")

_NAMESPACE = uuid.UUID("6f1d3c2e-41f5-4f7a-9a51-3c3f2f4d5e60")

INDEX_DDL = (
    "CREATE TABLE IF NOT EXISTS tidings_sagas ("
    "saga_id TEXT PRIMARY KEY, name TEXT NOT NULL, status TEXT NOT NULL, step TEXT, "
    "due_at DOUBLE PRECISION, started_at DOUBLE PRECISION NOT NULL, "
    "updated_at DOUBLE PRECISION NOT NULL, reason TEXT)",
    "CREATE INDEX IF NOT EXISTS tidings_sagas_due ON tidings_sagas (name, due_at)",
)

_UPSERT = (
    "INSERT INTO tidings_sagas (saga_id, name, status, step, due_at, started_at, updated_at, reason) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (saga_id) DO UPDATE SET status = excluded.status, "
    "step = excluded.step, due_at = excluded.due_at, updated_at = excluded.updated_at, "
    "reason = excluded.reason"
)


async def ensure_saga_index(store: SQLStore) -> None:
    """Create the ``tidings_sagas`` index table if it is missing (idempotent)."""

    def create(tx: Any) -> None:
        for statement in INDEX_DDL:
            tx.execute(statement)

    await store.transaction(create)


def timeouts_stream(saga: Saga) -> str:
    return f"saga-timeouts-{saga.name}"


class SagaHandler:
    """The handler function of a saga's group: dispatches each event to the instance it concerns."""

    def __init__(self, saga: Saga, clock: Clock) -> None:
        self.saga = saga
        self.clock = clock
        self.prefix = f"saga-{saga.name}-"

    def event_types(self) -> tuple[type[Event], ...]:
        return (
            *self.saga.start_types,
            *sorted(self.saga.reply_types(), key=lambda c: c.__event_type__),
            DeadlinePassed,
        )

    async def __call__(self, event: Event, ctx: HandlerContext) -> None:
        saga_id = self._saga_id(event, ctx)
        if saga_id is None:
            return
        ctx.caused_by = f"saga:{self.saga.name}"  # its state events; the commands name their step
        instance = await ctx.load(SagaInstance, saga_id, create=True)
        if instance.version and instance.saga != self.saga.name:
            return  # another saga whose id shares our prefix (saga 'order' vs 'order-refund')
        with tracing.saga_step_span(self.saga.name, saga_id, ctx.recorded.event_type) as span:
            before = instance.version
            if before == 0:
                if isinstance(event, self.saga.start_types) and not isinstance(event, DeadlinePassed):
                    self._start(instance, event, ctx)
            elif not instance.terminal:
                self._advance(instance, event, ctx)
            if instance.version != before:
                ctx.save(instance)
                self._index(instance, ctx)
            span.set("tidings.saga.step", instance.step or "")
            span.set("tidings.saga.status", instance.status)

    def _saga_id(self, event: Event, ctx: HandlerContext) -> str | None:
        if isinstance(event, DeadlinePassed):
            return event.saga_id if event.saga_id.startswith(self.prefix) else None
        carried = ctx.recorded.metadata.get("saga_id")
        if isinstance(carried, str) and carried.startswith(self.prefix):
            return carried
        if isinstance(event, self.saga.start_types):
            # A starting event may carry another saga's id (it answered that saga's command).
            key, _ = self._begin(event)
            return self.saga.saga_id(key)
        return None  # a reply for another saga, or an event no saga of ours sent for

    def _begin(self, event: Event) -> tuple[str, Mapping[str, Any]]:
        key, data = self.saga.start(event)
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"saga {self.saga.name!r}: start() must return a non-empty str key")
        return key, data

    # -- transitions --------------------------------------------------------------------------------

    def _start(self, instance: SagaInstance, event: Event, ctx: HandlerContext) -> None:
        key, data = self._begin(event)
        instance.record(
            SagaStarted(saga=self.saga.name, key=key, data=dict(data), started_by=str(ctx.recorded.event_id))
        )
        self._begin_step(instance, self.saga.step_list[0], ctx)

    def _advance(self, instance: SagaInstance, event: Event, ctx: HandlerContext) -> None:
        if instance.step is None:
            return  # nothing is waiting: a duplicate or late reply
        step = self.saga.step(instance.step)
        if isinstance(event, DeadlinePassed):
            if event.step != step.name or event.due_at != instance.due_at:
                return  # a deadline that no longer applies
            if instance.status == "running":
                # The command may have taken effect all the same: compensate this step too.
                reason = f"{step.name} timed out after {step.timeout:g}s"
                instance.record(StepFailed(step=step.name, reason=reason, compensate=True))
                self._compensate_next(instance, ctx)
            else:
                instance.record(SagaFailed(reason=f"compensation of {step.name} timed out"))
            return
        if ctx.recorded.metadata.get("saga_step") != step.name:
            return  # a reply to another step (late, or a duplicate): never runs a step twice
        if instance.status == "running":
            if isinstance(event, step.success_types):
                updates = dict(step.on_success(instance.data, event)) if step.on_success else {}
                instance.record(
                    StepSucceeded(step=step.name, reply_type=event.__event_type__, updates=updates)
                )
                following = self._following(step)
                if following is None:
                    instance.record(SagaCompleted())
                else:
                    self._begin_step(instance, following, ctx)
            elif isinstance(event, step.failure_types):
                instance.record(StepFailed(step=step.name, reason=f"{step.name}: {type(event).__name__}"))
                self._compensate_next(instance, ctx)
        elif isinstance(event, step.compensated_types):
            instance.record(CompensationDone(step=step.name))
            self._compensate_next(instance, ctx)

    def _following(self, step: Step) -> Step | None:
        steps = self.saga.step_list
        index = steps.index(step)
        return steps[index + 1] if index + 1 < len(steps) else None

    def _begin_step(self, instance: SagaInstance, step: Step, ctx: HandlerContext) -> None:
        command = step.command(instance.data)
        due = None if step.timeout is None else self.clock.now() + step.timeout
        instance.record(StepStarted(step=step.name, command_type=command.__event_type__, due_at=due))
        self._send(instance, step, command, ctx)

    def _compensate_next(self, instance: SagaInstance, ctx: HandlerContext) -> None:
        """Compensate the most recent step not yet compensated; end the saga when none is left."""
        while instance.done:
            step = self.saga.step(instance.done[-1])
            if step.compensation is None:
                instance.record(CompensationDone(step=step.name))
                continue
            command = step.compensation(instance.data)
            waits = bool(step.compensated_types)
            due = self.clock.now() + step.timeout if waits and step.timeout is not None else None
            instance.record(
                CompensationStarted(step=step.name, command_type=command.__event_type__, due_at=due)
            )
            self._send(instance, step, command, ctx, compensation=True)
            if waits:
                return
            instance.record(CompensationDone(step=step.name))
        instance.record(SagaCompensated(reason=instance.reason or "compensated"))

    def _send(
        self,
        instance: SagaInstance,
        step: Step,
        command: Event,
        ctx: HandlerContext,
        compensation: bool = False,
    ) -> None:
        metadata: dict[str, Any] = {"saga_id": instance.id, "saga_step": step.name, "destination": step.to}
        metadata["caused_by"] = f"saga:{self.saga.name}.{step.name}"
        if compensation:
            metadata["compensation"] = True  # carried to the replies (REPLY_KEYS): a trace flags them
        ctx.emit(f"cmd-{step.to}-{instance.id}", [command], metadata=metadata)

    def _index(self, instance: SagaInstance, ctx: HandlerContext) -> None:
        now = self.clock.now()
        ctx.execute(
            _UPSERT,
            (
                instance.id,
                self.saga.name,
                instance.status,
                instance.step,
                instance.due_at,
                now,
                now,
                instance.reason,
            ),
        )


class DeadlineTimer:
    """Fires the deadlines of one saga: appends :class:`DeadlinePassed` when a step's time is up.

    Runs beside the service's subscriptions. It reads the due deadlines from the index, so a
    deadline set before a restart fires after it; the event id is derived from (saga, step,
    deadline), so several timers, or a timer that crashed after appending, append it once.
    """

    def __init__(self, store: SQLStore, saga: Saga, clock: Clock, poll_interval: float) -> None:
        self.store = store
        self.saga = saga
        self.clock = clock
        self.poll_interval = poll_interval
        self.fired = 0

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            following: float | None = None
            try:
                following = await self.fire_due()
            except Exception as exc:
                # Never let the timer die: no deadline would fire until the service restarts.
                level = logging.WARNING if is_transient(exc) else logging.ERROR
                log.log(level, "saga %r: deadline timer: %s", self.saga.name, exc, exc_info=exc)
            await self._wait(stopping, following)

    async def fire_due(self) -> float | None:
        """Append a :class:`DeadlinePassed` for every deadline that has passed; return the next one."""
        rows = await self.store.query(
            "SELECT saga_id, step, due_at FROM tidings_sagas WHERE name = ? AND due_at IS NOT NULL "
            "ORDER BY due_at LIMIT 500",
            (self.saga.name,),
        )
        now = self.clock.now()
        for saga_id, step, due_at in rows:
            if float(due_at) > now:
                return float(due_at)
            event = DeadlinePassed(saga_id=saga_id, step=step, due_at=float(due_at))
            event_id = uuid.uuid5(_NAMESPACE, f"{saga_id}/{step}/{float(due_at)!r}")
            metadata = await self._conversation(saga_id, step)
            await self.store.append(
                timeouts_stream(self.saga), [event], event_ids=[event_id], metadata=metadata
            )
            self.fired += 1
        return None

    async def _conversation(self, saga_id: str, step: str) -> dict[str, Any]:
        """The metadata of a deadline: the saga's conversation (its last event's correlation id,
        that event as the cause), so that what the timeout sets off stays in the same trace."""
        metadata: dict[str, Any] = {"saga_id": saga_id, "caused_by": f"saga:{self.saga.name}.{step}.deadline"}
        try:
            stored = [
                e async for e in self.store.read_stream(saga_id, backwards=True, limit=1, raw_unknown=True)
            ]
        except TidingsError as exc:
            if is_transient(exc):
                raise
            stored = []  # an unreadable saga stream must not keep its deadline from firing
        if stored:
            metadata["correlation_id"] = stored[0].correlation_id or str(stored[0].event_id)
            metadata["causation_id"] = str(stored[0].event_id)
        return metadata

    async def _wait(self, stopping: asyncio.Event, instant: float | None) -> None:
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(stopping.wait())]
        if instant is not None:
            waits.append(asyncio.ensure_future(self.clock.sleep_until(instant)))
        try:
            await asyncio.wait(waits, timeout=self.poll_interval, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
