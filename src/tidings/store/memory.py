"""The in-memory store (``memory://``): the whole contract, no persistence.

Events are kept in their encoded form, exactly as a database would hold them, so encoding errors,
upcasting and unknown types behave as on every other backend. Appends run without awaiting in the
middle, so on one event loop they are atomic without a lock.
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from tidings.errors import CheckpointConflict, ProjectionError
from tidings.events import EventRegistry
from tidings.store.base import (
    AppendRequest,
    AppendResult,
    EventStore,
    Row,
    Snapshot,
    StreamInfo,
    now_micros,
)
from tidings.store.deadletters import DeadLetterNotFound
from tidings.store.records import DeadLetter, ProcessedBatch, Tx

T = TypeVar("T")

__all__ = ["MemoryStore"]


class MemoryStore(EventStore):
    """An :class:`~tidings.store.EventStore` held in process memory; for tests and tooling."""

    def __init__(self, url: str = "memory://", *, registry: EventRegistry | None = None) -> None:
        super().__init__(url, registry=registry)
        self._log: list[Row] = []
        self._streams: dict[str, list[Row]] = {}
        self._ids: dict[uuid.UUID, Row] = {}
        self._snapshots: dict[str, dict[int, Snapshot]] = {}
        self._checkpoints_by_group: dict[str, int] = {}
        self._inbox: dict[str, set[uuid.UUID]] = {}
        self._parked: dict[int, DeadLetter] = {}
        self._next_dead_letter = 1

    async def _open(self) -> None:
        return None

    async def _close(self) -> None:
        return None

    async def _append(self, request: AppendRequest) -> AppendResult:
        stream = self._streams.get(request.stream_id, [])
        version = len(stream)
        head = len(self._log)
        existing = []
        if request.explicit_ids:
            for e in request.events:
                row = self._ids.get(e.event_id)
                if row is not None:
                    existing.append((row[3], row[1], row[2], row[0]))
        resolved = request.resolve(version, stream[-1][0] if stream else 0, existing)
        if resolved is not None:
            return resolved
        ts = now_micros()
        rows = [
            (
                head + i + 1,
                request.stream_id,
                version + i + 1,
                e.event_id,
                e.event_type,
                e.schema_version,
                ts,
                e.data,
                request.metadata,
            )
            for i, e in enumerate(request.events)
        ]
        self._log.extend(rows)
        self._streams.setdefault(request.stream_id, []).extend(rows)
        for row in rows:
            self._ids[row[3]] = row
        self._notify_appended()
        return AppendResult(rows[-1][2], rows[-1][0])

    async def _fetch_stream(
        self, stream_id: str, after: int, before: int | None, backwards: bool, limit: int
    ) -> list[Row]:
        stream = self._streams.get(stream_id, [])
        upper = len(stream) if before is None else min(len(stream), max(before - 1, 0))
        selected = stream[after:upper] if after < upper else []
        if backwards:
            return selected[::-1][:limit]
        return selected[:limit]

    async def _fetch_all(
        self, after: int, types: tuple[str, ...] | None, prefix: str | None, limit: int
    ) -> tuple[list[Row], int | None]:
        out: list[Row] = []
        wanted = None if types is None else set(types)
        for row in self._log[after:]:
            if wanted is not None and row[4] not in wanted:
                continue
            if prefix is not None and not row[1].startswith(prefix):
                continue
            out.append(row)
            if len(out) == limit:
                return out, row[0]
        return out, None

    async def _stream_version(self, stream_id: str) -> int:
        return len(self._streams.get(stream_id, ()))

    async def _head(self) -> int:
        return len(self._log)

    async def _list_streams(self, prefix: str | None, after: str | None, limit: int) -> list[StreamInfo]:
        names = sorted(self._streams)
        start = 0 if after is None else bisect.bisect_right(names, after)
        out: list[StreamInfo] = []
        for name in names[start:]:
            if prefix is not None and not name.startswith(prefix):
                continue
            last = self._streams[name][-1]
            out.append(StreamInfo(name, last[2], last[0]))
            if len(out) == limit:
                break
        return out

    async def _version_at(self, stream_id: str, micros: int) -> int:
        version = 0
        for row in self._streams.get(stream_id, ()):
            if row[6] > micros:
                break
            version = row[2]
        return version

    async def _save_snapshot(self, snapshot: Snapshot) -> None:
        self._snapshots.setdefault(snapshot.stream_id, {})[snapshot.version] = snapshot

    async def _load_snapshot(self, stream_id: str, max_version: int | None) -> Snapshot | None:
        stored = self._snapshots.get(stream_id, {})
        versions = [v for v in stored if max_version is None or v <= max_version]
        return stored[max(versions)] if versions else None

    # -- processing records ----------------------------------------------------------------------

    async def _load_checkpoint(self, group: str) -> int:
        return self._checkpoints_by_group.get(group, 0)

    async def _checkpoints(self) -> dict[str, int]:
        return dict(self._checkpoints_by_group)

    async def _set_checkpoint(self, group: str, position: int | None) -> None:
        if position is None:
            self._checkpoints_by_group.pop(group, None)
            self._inbox.pop(group, None)
        else:
            self._checkpoints_by_group[group] = position

    async def _commit_processed(self, batch: ProcessedBatch) -> list[AppendResult]:
        actual = self._checkpoints_by_group.get(batch.group, 0)
        if actual != batch.expected_checkpoint:
            raise CheckpointConflict(batch.group, batch.expected_checkpoint, actual)
        if batch.work is not None:
            raise ProjectionError(_NO_SQL)
        if batch.remove_dead_letter is not None and batch.remove_dead_letter not in self._parked:
            raise DeadLetterNotFound(batch.group, batch.remove_dead_letter)
        # Resolve every append against the state as it would be, before changing anything, so
        # the batch stays all-or-nothing and follows the same rules (exact retries included).
        versions: dict[str, tuple[int, int]] = {}
        planned_ids: dict[uuid.UUID, tuple[Any, ...]] = {}
        results: list[AppendResult | None] = []
        head = len(self._log)
        for request in batch.appends:
            stream = self._streams.get(request.stream_id, [])
            version, last = versions.get(request.stream_id, (len(stream), stream[-1][0] if stream else 0))
            existing = []
            for e in request.events:
                row = self._ids.get(e.event_id)
                if row is not None:
                    existing.append((row[3], row[1], row[2], row[0]))
                elif e.event_id in planned_ids:
                    existing.append(planned_ids[e.event_id])
            resolved = request.resolve(version, last, existing)
            results.append(resolved)
            if resolved is None:
                for i, e in enumerate(request.events, start=1):
                    planned_ids[e.event_id] = (e.event_id, request.stream_id, version + i, head + i)
                head += len(request.events)
                versions[request.stream_id] = (version + len(request.events), head)
        # Nothing above awaits: the dead letter checked at the top is still there, and removing it
        # before the first await makes a concurrent retry of it fail at that check.
        if batch.remove_dead_letter is not None:
            del self._parked[batch.remove_dead_letter]
        out = [
            resolved if resolved is not None else await self._append(request)
            for request, resolved in zip(batch.appends, results, strict=True)
        ]
        self._inbox.setdefault(batch.group, set()).update(e for e, _ in batch.processed)
        for d in batch.dead_letters:
            parked = next(
                (p for p in self._parked.values() if p.group == batch.group and p.event_id == d.event_id),
                None,
            )
            number = parked.id if parked is not None else self._next_dead_letter
            self._parked[number] = DeadLetter(
                number,
                batch.group,
                d.position,
                d.event_id,
                d.stream_id,
                d.event_type,
                d.error,
                d.traceback,
                d.attempts + (parked.attempts if parked is not None else 0),
                datetime.now(UTC),
            )
            if parked is None:
                self._next_dead_letter += 1
        self._checkpoints_by_group[batch.group] = batch.checkpoint
        return out

    async def _processed_ids(self, group: str, event_ids: list[uuid.UUID]) -> set[uuid.UUID]:
        return self._inbox.get(group, set()).intersection(event_ids)

    async def _dead_letters(self, group: str | None, id: int | None) -> list[DeadLetter]:
        return [
            d
            for i, d in sorted(self._parked.items())
            if (group is None or d.group == group) and (id is None or i == id)
        ]

    async def _discard_dead_letter(self, id: int) -> bool:
        return self._parked.pop(id, None) is not None

    async def _transaction(self, fn: Callable[[Tx], T]) -> T:
        raise ProjectionError(_NO_SQL)

    async def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise ProjectionError(_NO_SQL)


_NO_SQL = (
    "the memory:// store has no SQL database for projections; use sqlite:///path.db "
    "(or postgresql://) for SQL read models"
)
