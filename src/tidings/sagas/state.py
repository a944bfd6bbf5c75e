"""A saga instance's durable state: an event-sourced aggregate in its own stream.

Every transition of a saga is an event in the stream ``saga-<name>-<key>``, so its history is
inspectable with the ordinary tools (``tidings events saga-checkout-42``, ``tidings sagas show``)
and its state after a restart is the replay of that stream.
"""

from __future__ import annotations

from typing import Any, Literal

from tidings.aggregate import Aggregate
from tidings.events import Event

__all__ = [
    "CompensationDone",
    "CompensationStarted",
    "DeadlinePassed",
    "SagaCompensated",
    "SagaCompleted",
    "SagaFailed",
    "SagaInstance",
    "SagaStarted",
    "SagaStatus",
    "StepFailed",
    "StepStarted",
    "StepSucceeded",
]

SagaStatus = Literal["running", "compensating", "completed", "compensated", "failed"]
TERMINAL: frozenset[str] = frozenset({"completed", "compensated", "failed"})


class SagaStarted(Event):
    __event_type__ = "tidings.saga.SagaStarted"
    saga: str
    key: str
    data: dict[str, Any]
    started_by: str


class StepStarted(Event):
    __event_type__ = "tidings.saga.StepStarted"
    step: str
    command_type: str
    due_at: float | None = None


class StepSucceeded(Event):
    __event_type__ = "tidings.saga.StepSucceeded"
    step: str
    reply_type: str
    updates: dict[str, Any] = {}


class StepFailed(Event):
    """A step failed. ``compensate`` is true when its command may have taken effect all the same
    (it timed out), so the step is compensated too; false when the owner answered that it failed."""

    __event_type__ = "tidings.saga.StepFailed"
    step: str
    reason: str
    compensate: bool = False


class CompensationStarted(Event):
    __event_type__ = "tidings.saga.CompensationStarted"
    step: str
    command_type: str
    due_at: float | None = None


class CompensationDone(Event):
    __event_type__ = "tidings.saga.CompensationDone"
    step: str


class SagaCompleted(Event):
    __event_type__ = "tidings.saga.SagaCompleted"


class SagaCompensated(Event):
    __event_type__ = "tidings.saga.SagaCompensated"
    reason: str


class SagaFailed(Event):
    __event_type__ = "tidings.saga.SagaFailed"
    reason: str


class DeadlinePassed(Event):
    """Appended by the saga's timer (to ``saga-timeouts-<name>``) when a step's deadline passes;
    the saga takes the failure path if the step is still waiting for that deadline."""

    __event_type__ = "tidings.saga.DeadlinePassed"
    saga_id: str
    step: str
    due_at: float


class SagaInstance(Aggregate):
    """The state of one saga: where it is, what it knows, and which steps it must compensate."""

    saga: str = ""
    key: str = ""
    status: str = "new"
    data: dict[str, Any] = {}
    step: str | None = None
    due_at: float | None = None
    done: list[str] = []
    reason: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def apply(self, event: Event) -> None:
        match event:
            case SagaStarted(saga=saga, key=key, data=data):
                self.saga, self.key, self.data, self.status = saga, key, dict(data), "running"
            case StepStarted(step=step, due_at=due_at):
                self.step, self.due_at = step, due_at
            case StepSucceeded(step=step, updates=updates):
                self.data = {**self.data, **updates}
                self.done = [*self.done, step]
                self.step, self.due_at = None, None
            case StepFailed(step=step, reason=reason, compensate=compensate):
                self.status, self.reason = "compensating", reason
                self.step, self.due_at = None, None
                if compensate:
                    self.done = [*self.done, step]
            case CompensationStarted(step=step, due_at=due_at):
                self.status, self.step, self.due_at = "compensating", step, due_at
            case CompensationDone(step=step):
                self.done = [s for s in self.done if s != step]
                self.step, self.due_at = None, None
            case SagaCompleted():
                self.status, self.step, self.due_at = "completed", None, None
            case SagaCompensated(reason=reason):
                self.status, self.reason, self.step, self.due_at = "compensated", reason, None, None
            case SagaFailed(reason=reason):
                self.status, self.reason, self.step, self.due_at = "failed", reason, None, None
