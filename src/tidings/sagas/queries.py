"""Reading sagas: the index of instances by state, and one instance's history."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from tidings.errors import InvalidArgument, StatementError
from tidings.events import Event, RecordedEvent
from tidings.sagas.state import TERMINAL, SagaInstance
from tidings.store.base import EventStore
from tidings.store.tracking import SQLStore

__all__ = ["SagaSummary", "list_sagas", "saga_history", "saga_state"]

STATUSES = ("running", "compensating", "completed", "compensated", "failed")


@dataclasses.dataclass(frozen=True, slots=True)
class SagaSummary:
    """One saga instance as the index knows it."""

    saga_id: str
    name: str
    status: str
    step: str | None
    due_at: datetime | None
    updated_at: datetime
    reason: str | None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def _when(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(float(value), UTC)


async def list_sagas(
    store: SQLStore, *, name: str | None = None, status: str | None = None, limit: int = 1000
) -> list[SagaSummary]:
    """Saga instances, most recently changed first, optionally of one saga and/or one status."""
    if status is not None and status not in STATUSES:
        raise InvalidArgument(f"unknown saga status {status!r}; use one of {', '.join(STATUSES)}")
    if not isinstance(limit, int) or limit < 1:
        raise InvalidArgument(f"limit must be an int >= 1, got {limit!r}")
    sql = "SELECT saga_id, name, status, step, due_at, updated_at, reason FROM tidings_sagas WHERE 1 = 1"
    params: list[object] = []
    if name is not None:
        sql += " AND name = ?"
        params.append(name)
    if status is not None:
        sql += " AND status = ?"
        params.append(status)
    sql += " ORDER BY updated_at DESC, saga_id LIMIT ?"
    params.append(limit)
    try:
        rows = await store.query(sql, params)
    except StatementError as exc:
        if "tidings_sagas" in str(exc):
            return []  # no saga has ever run against this store
        raise
    return [
        SagaSummary(r[0], r[1], r[2], r[3], _when(r[4]), _when(r[5]) or datetime.fromtimestamp(0, UTC), r[6])
        for r in rows
    ]


async def saga_history(store: EventStore, saga_id: str) -> list[RecordedEvent]:
    """Every transition of one saga instance, in order (its stream)."""
    return [e async for e in store.read_stream(saga_id)]


async def saga_state(store: EventStore, saga_id: str) -> SagaInstance:
    """The current state of one saga instance (the replay of its stream)."""
    instance = SagaInstance(saga_id)
    async for recorded in store.read_stream(saga_id):
        if isinstance(recorded.event, Event):
            instance.apply(recorded.event)
        instance.version = recorded.version
    return instance
