"""Records the processing layer stores beside the events: checkpoints' batches, dead letters.

They live with the store because exactly-once effects need them in the *same transaction* as
the effects they describe (principle 2 of the architecture).
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from tidings.store.base import AppendRequest

__all__ = ["DeadLetter", "DeadLetterRecord", "ProcessedBatch", "Tx", "dead_letter_filter"]


class Tx(Protocol):
    """A database transaction handed to projection code (sync; runs on the store's worker).

    ``execute`` takes ``?`` placeholders on every backend, and replaces ``{name}`` for each table
    the projection declared with that table's physical name (blue/green rebuilds swap them).

    A ``?`` inside a string literal, quoted identifier or comment is not a placeholder, and ``%``
    needs no escaping. On PostgreSQL, write the JSON operators ``?``, ``?|`` and ``?&`` doubled
    (``items ?? 'sku'``, ``items ??| array['a']``, ``items ??& array['a']``) or use
    ``jsonb_exists(items, 'sku')``, ``jsonb_exists_any`` and ``jsonb_exists_all``
    (see :mod:`tidings.store.postgres.tx`).
    """

    dialect: str

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None: ...

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetterRecord:
    """A failed event to park: what failed, why, and after how many attempts."""

    position: int
    event_id: uuid.UUID
    stream_id: str
    event_type: str
    error: str
    traceback: str
    attempts: int


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetter:
    """A parked event as stored, with its id in the dead-letter store."""

    id: int
    group: str
    position: int
    event_id: uuid.UUID
    stream_id: str
    event_type: str
    error: str
    traceback: str
    attempts: int
    failed_at: datetime


def dead_letter_filter(group: str | None, id: int | None, mark: str) -> tuple[str, list[Any]]:
    """The ``AND ...`` conditions (with ``mark`` as the placeholder) and parameters selecting
    dead letters by group and/or id, for each backend's query."""
    sql = ""
    params: list[Any] = []
    if group is not None:
        sql += f" AND group_name = {mark}"
        params.append(group)
    if id is not None:
        sql += f" AND id = {mark}"
        params.append(id)
    return sql, params


@dataclasses.dataclass(frozen=True, slots=True)
class ProcessedBatch:
    """Everything one step of a subscription commits, atomically.

    ``expected_checkpoint`` guards against a second runner of the same group: if the stored
    checkpoint differs, nothing is written and :class:`~tidings.CheckpointConflict` is raised.
    ``work`` (projections) runs first inside the transaction; then ``appends`` (events emitted by
    handlers), ``processed`` (inbox rows), ``dead_letters`` and the new ``checkpoint``.
    """

    group: str
    expected_checkpoint: int
    checkpoint: int
    work: Callable[[Tx], None] | None = None
    appends: tuple[AppendRequest, ...] = ()
    processed: tuple[tuple[uuid.UUID, int], ...] = ()
    dead_letters: tuple[DeadLetterRecord, ...] = ()
    remove_dead_letter: int | None = None
