"""Orchestration: sagas (process managers) with steps, compensations and durable deadlines.

A saga is started by an event, keeps its state as its own event-sourced stream, sends commands
to other services step by step and reacts to their replies. When a step fails (a failure reply,
or no reply before its deadline), the steps done so far are compensated in reverse order, and the
saga ends in a clear terminal state: ``completed``, ``compensated`` or ``failed`` (a compensation
itself failed), with the reason. See :class:`Saga` and :meth:`tidings.Service.add_saga`.
"""

from tidings.sagas.clock import Clock, ManualClock, SystemClock
from tidings.sagas.definition import Saga, Step
from tidings.sagas.queries import SagaSummary, list_sagas, saga_history, saga_state
from tidings.sagas.runtime import DeadlineTimer, SagaHandler, ensure_saga_index
from tidings.sagas.state import DeadlinePassed, SagaInstance, SagaStatus

__all__ = [
    "Clock",
    "DeadlinePassed",
    "DeadlineTimer",
    "ManualClock",
    "Saga",
    "SagaHandler",
    "SagaInstance",
    "SagaStatus",
    "SagaSummary",
    "Step",
    "SystemClock",
    "ensure_saga_index",
    "list_sagas",
    "saga_history",
    "saga_state",
]
