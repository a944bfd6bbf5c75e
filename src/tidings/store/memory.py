"""The in-memory store (``memory://``): the whole contract, no persistence.

Events are kept in their encoded form, exactly as a database would hold them, so encoding errors,
upcasting and unknown types behave as on every other backend. Appends run without awaiting in the
middle, so on one event loop they are atomic without a lock.
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

from tidings.errors import AlreadyProcessed, CheckpointConflict, TidingsError, UnsupportedOperation
from tidings.events import EventRegistry
from tidings.store.append import AppendPlan, AppendRequest, AppendResult, StoredId, plan_appends
from tidings.store.base import Row, Snapshot, StreamInfo, correlation_of, now_micros
from tidings.store.deadletters import DeadLetterNotFound
from tidings.store.tracking import DeadLetter, DeadLetterQuery, ProcessedBatch, TrackingStore

T = TypeVar("T")

__all__ = ["MemoryStore"]


class MemoryStore(TrackingStore):
    """A :class:`~tidings.store.TrackingStore` held in process memory; for tests and tooling.

    It has no SQL database, so it is not a :class:`~tidings.store.SQLStore`: projections (SQL read
    models) are refused on it with :class:`~tidings.UnsupportedOperation`.
    """

    def __init__(self, url: str = "memory://", *, registry: EventRegistry | None = None) -> None:
        super().__init__(url, registry=registry)
        self._log: list[Row] = []
        self._streams: dict[str, list[Row]] = {}
        self._ids: dict[uuid.UUID, Row] = {}
        self._correlated: dict[str, list[Row]] = {}
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
        [outcome] = self._write(self._plan([request]))
        if isinstance(outcome, TidingsError):
            raise outcome
        return outcome

    def _plan(self, requests: Sequence[AppendRequest]) -> AppendPlan:
        """The shared append rules applied to ``requests`` against the current state."""
        streams: dict[str, tuple[int, int]] = {}
        stored: dict[uuid.UUID, StoredId] = {}
        for request in requests:
            stream = self._streams.get(request.stream_id)
            if stream:
                streams[request.stream_id] = (len(stream), stream[-1][0])
            if request.explicit_ids:
                for e in request.events:
                    row = self._ids.get(e.event_id)
                    if row is not None:
                        stored[e.event_id] = StoredId(row[1], row[2], row[0])
        return plan_appends(requests, streams, stored)

    def _write(self, plan: AppendPlan) -> list[AppendResult | TidingsError]:
        """Store the plan's events after the current head; return the outcomes."""
        head = len(self._log)
        if plan.events:
            ts = now_micros()
            for offset, stream_id, version, e, meta in plan.events:
                row = (
                    head + offset,
                    stream_id,
                    version,
                    e.event_id,
                    e.event_type,
                    e.schema_version,
                    ts,
                    e.data,
                    meta,
                )
                self._log.append(row)
                self._streams.setdefault(stream_id, []).append(row)
                self._ids[e.event_id] = row
                # Only metadata that names a correlation id is parsed: the index of correlated reads.
                if meta is not None and b'"correlation_id"' in meta:
                    correlation = correlation_of(meta)
                    if correlation is not None:
                        self._correlated.setdefault(correlation, []).append(row)
            self._notify_appended()
        return plan.outcomes_at(head)

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

    async def _fetch_correlated(
        self, ids: tuple[str, ...], event_ids: tuple[uuid.UUID, ...], after: int, limit: int
    ) -> list[Row]:
        found = {row[0]: row for key in ids for row in self._correlated.get(key, ())}
        for event_id in event_ids:
            row = self._ids.get(event_id)
            if row is not None:
                found[row[0]] = row
        return [found[p] for p in sorted(found) if p > after][:limit]

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
            raise UnsupportedOperation(
                f"{self.safe_url}: a subscription step with SQL work (a projection) needs a SQL "
                "store; use sqlite:///path.db or postgresql://... instead"
            )
        if batch.remove_dead_letter is not None and batch.remove_dead_letter not in self._parked:
            raise DeadLetterNotFound(batch.group, batch.remove_dead_letter)
        done = self._inbox.get(batch.group, set()).intersection(e for e, _ in batch.processed)
        if done:
            raise AlreadyProcessed(batch.group, sorted(done))
        # Plan every append before changing anything, so the batch stays all-or-nothing and
        # follows the same rules (exact retries included) as on every backend.
        plan = self._plan(batch.appends)
        for outcome in plan.outcomes:
            if isinstance(outcome, TidingsError):
                raise outcome
        out = [o for o in self._write(plan) if isinstance(o, AppendResult)]
        # Nothing here awaits: the dead letter checked above is still there, and a concurrent
        # retry of it fails at that check once it is gone.
        if batch.remove_dead_letter is not None:
            del self._parked[batch.remove_dead_letter]
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

    async def _dead_letters(
        self, group: str | None, id: int | None, query: DeadLetterQuery | None = None
    ) -> list[DeadLetter]:
        query = query or DeadLetterQuery()
        found = [
            d
            for i, d in sorted(self._parked.items())
            if (group is None or d.group == group) and (id is None or i == id) and query.matches(d)
        ]
        return found if query.limit is None else found[: query.limit]

    async def _count_dead_letters(self, group: str | None) -> int:
        return sum(1 for d in self._parked.values() if group is None or d.group == group)

    async def _discard_dead_letter(self, id: int) -> bool:
        return self._parked.pop(id, None) is not None
