"""The processing capability: what subscriptions store beside the events, and SQL transactions.

Capabilities are layers, and a backend states what it can do by the class it implements:

* :class:`~tidings.store.base.EventStore` -- streams, the global log, snapshots, change
  notification;
* :class:`TrackingStore` -- adds what subscriptions need: checkpoints, the inbox of processed
  event ids, dead letters, the atomic commit of one subscription step
  (:meth:`~TrackingStore.commit_processed`), ``wait_for`` and the per-group locks;
* :class:`SQLStore` -- adds SQL on the store's own database (:meth:`~SQLStore.transaction`,
  :meth:`~SQLStore.query`, the :class:`Tx` protocol): what projections (SQL read models) need.

The memory store is a :class:`TrackingStore`; SQLite and PostgreSQL are :class:`SQLStore`. Code that
needs a capability checks for it up front with :func:`require`, so a backend without it is refused
with :class:`~tidings.UnsupportedOperation` when a service starts, not deep inside a runner.

These records live with the store because exactly-once effects need them in the *same transaction*
as the effects they describe (principle 2 of the architecture).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Final, Protocol, TypeVar, cast

from tidings.errors import InvalidArgument, UnsupportedOperation
from tidings.events import EventRegistry
from tidings.store.append import AppendRequest, AppendResult
from tidings.store.base import EventStore, validate_position, validate_text, validate_timeout

__all__ = [
    "MAX_DEAD_LETTER_IDS",
    "DeadLetter",
    "DeadLetterQuery",
    "DeadLetterRecord",
    "ProcessedBatch",
    "ProjectionGeneration",
    "SQLStore",
    "TrackingStore",
    "Tx",
    "dead_letter_filter",
    "forget_group",
    "load_generation",
    "require",
    "save_generation",
    "validate_group",
]

T = TypeVar("T")
S = TypeVar("S", bound=EventStore)

MAX_GROUP_LENGTH: Final = 200


def validate_group(group: object) -> str:
    """Return ``group`` if it is an acceptable subscription group name, else raise."""
    if (
        not isinstance(group, str)
        or not group
        or len(group) > MAX_GROUP_LENGTH
        or "\x00" in group
        or not _encodable(group)
    ):
        raise InvalidArgument(
            f"subscription group must be a non-empty str of at most {MAX_GROUP_LENGTH} characters, "
            f"got {group!r:.80}"
        )
    return group


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class Tx(Protocol):
    """A database transaction handed to projection code (sync; runs on the store's worker).

    ``execute`` takes ``?`` placeholders on every backend, and replaces ``{name}`` for each table
    the projection declared with that table's physical name (blue/green rebuilds swap them).

    A ``?`` inside a string literal, quoted identifier or comment is not a placeholder, and ``%``
    needs no escaping. On PostgreSQL, write the JSON operators ``?``, ``?|`` and ``?&`` doubled
    (``items ?? 'sku'``, ``items ??| array['a']``, ``items ??& array['a']``) or use
    ``jsonb_exists(items, 'sku')``, ``jsonb_exists_any`` and ``jsonb_exists_all``
    (see :mod:`tidings.store.postgres.tx`).
    Driver errors are raised as tidings' own: :class:`~tidings.StoreUnavailable` (transient: a lock,
    a lost connection, a timeout), :class:`~tidings.StatementError` (permanent: the SQL or a value is
    refused) or :class:`~tidings.IntegrityError` (a constraint), chained to the driver's error.
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


MAX_DEAD_LETTER_IDS: Final = 500
"""Event ids per query of :meth:`TrackingStore.dead_letters_of` (more are read in chunks)."""


@dataclasses.dataclass(frozen=True, slots=True)
class DeadLetterQuery:
    """Which dead letters a backend's ``_dead_letters`` returns: of ``group``, the one with
    ``id``, those with an id above ``after_id``, of the events ``event_ids`` (backend form, at
    most :data:`MAX_DEAD_LETTER_IDS`), at most ``limit`` -- always in id order."""

    group: str | None = None
    id: int | None = None
    after_id: int = 0
    event_ids: tuple[Any, ...] | None = None
    limit: int | None = None

    def matches(self, dead: DeadLetter) -> bool:
        """Whether ``dead`` is selected (``event_ids`` as UUIDs), ignoring ``limit``."""
        return (
            (self.group is None or dead.group == self.group)
            and (self.id is None or dead.id == self.id)
            and dead.id > self.after_id
            and (self.event_ids is None or dead.event_id in self.event_ids)
        )


def dead_letter_filter(
    group: str | None, id: int | None, mark: str, query: DeadLetterQuery | None = None
) -> tuple[str, list[Any]]:
    """The ``AND ...`` conditions (with ``mark`` as the placeholder) and parameters selecting
    dead letters by group and/or id (and by ``query``'s ``after_id`` and ``event_ids``), for
    each backend's query. ``query``'s ``limit`` is the caller's to add, after ``ORDER BY id``."""
    sql = ""
    params: list[Any] = []
    if group is not None:
        sql += f" AND group_name = {mark}"
        params.append(group)
    if id is not None:
        sql += f" AND id = {mark}"
        params.append(id)
    if query is not None and query.after_id:
        sql += f" AND id > {mark}"
        params.append(query.after_id)
    if query is not None and query.event_ids is not None:
        sql += (
            f" AND event_id IN ({', '.join([mark] * len(query.event_ids))})"
            if query.event_ids
            else " AND 1=0"
        )
        params.extend(query.event_ids)
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


class TrackingStore(EventStore):
    """An :class:`EventStore` that also keeps what subscriptions need: checkpoints, the inbox of
    processed event ids and dead letters, committed atomically with a subscription's own appends
    (:meth:`commit_processed`)."""

    def __init__(self, url: str, *, registry: EventRegistry | None = None) -> None:
        super().__init__(url, registry=registry)
        self._checkpoint_changed = asyncio.Event()

    async def load_checkpoint(self, group: str) -> int:
        """The position up to which ``group`` has processed the log (0 if never)."""
        self._check_open()
        return await self._load_checkpoint(validate_group(group))

    async def checkpoints(self) -> dict[str, int]:
        """Every subscription group's checkpoint."""
        self._check_open()
        return await self._checkpoints()

    async def commit_processed(self, batch: ProcessedBatch) -> list[AppendResult]:
        """Commit one step of a subscription atomically (see :class:`ProcessedBatch`).

        Returns the results of the batch's appends. Raises :class:`~tidings.CheckpointConflict`
        when another runner moved the group's checkpoint; any error means nothing was written.
        """
        validate_group(batch.group)
        self._check_open()
        results = await self._commit_processed(batch)
        self._notify_checkpoint()
        if batch.appends:
            self.append_calls += len(batch.appends)
            self.appended_events += sum(len(request.events) for request in batch.appends)
            self._notify_appended()
        return results

    async def processed_ids(self, group: str, event_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Those of ``event_ids`` that ``group`` has recorded as processed (its inbox)."""
        group = validate_group(group)
        ids = _uuid_list("event_ids", event_ids)
        self._check_open()
        if not ids:
            return set()
        return await self._processed_ids(group, ids)

    async def dead_letters(
        self, group: str | None = None, *, after_id: int = 0, limit: int | None = None
    ) -> list[DeadLetter]:
        """Parked events, oldest first, optionally of one group; a page of them with ``after_id``
        (only ids above it: the last id of the previous page) and ``limit``."""
        validate_position("after_id", after_id)
        validate_position("limit", limit, allow_none=True)
        self._check_open()
        group = None if group is None else validate_group(group)
        if limit == 0:
            return []
        return await self._dead_letters(group, None, DeadLetterQuery(group, after_id=after_id, limit=limit))

    async def dead_letters_of(self, event_ids: Iterable[uuid.UUID]) -> list[DeadLetter]:
        """The dead letters (of any group) of the events ``event_ids``, in id order: read by
        event id (in chunks of :data:`MAX_DEAD_LETTER_IDS`), not by loading every letter."""
        ids = list(dict.fromkeys(_uuid_list("event_ids", event_ids)))
        self._check_open()
        found: list[DeadLetter] = []
        for start in range(0, len(ids), MAX_DEAD_LETTER_IDS):
            chunk = tuple(self._dead_letter_event_id(i) for i in ids[start : start + MAX_DEAD_LETTER_IDS])
            found.extend(await self._dead_letters(None, None, DeadLetterQuery(event_ids=chunk)))
        return sorted(found, key=lambda d: d.id)

    async def count_dead_letters(self, group: str | None = None) -> int:
        """How many events are parked, optionally of one group (counted by the database)."""
        self._check_open()
        return await self._count_dead_letters(None if group is None else validate_group(group))

    async def dead_letter(self, id: int) -> DeadLetter | None:
        """One parked event by its id, or None."""
        validate_position("dead letter id", id)
        self._check_open()
        found = await self._dead_letters(None, id)
        return found[0] if found else None

    async def discard_dead_letter(self, id: int) -> bool:
        """Delete a parked event without processing it; False if there was none with that id."""
        validate_position("dead letter id", id)
        self._check_open()
        return await self._discard_dead_letter(id)

    async def set_checkpoint(self, group: str, position: int | None) -> None:
        """Move ``group``'s checkpoint by hand (None deletes it, so the group replays history)."""
        validate_position("position", position, allow_none=True)
        self._check_open()
        await self._set_checkpoint(validate_group(group), position)
        self._notify_checkpoint()

    def group_lock(self, group: str) -> asyncio.Lock:
        """The lock that lets one runner per subscription group work in this process at a time.

        Shared by every store object of this process that opens the same database (two services
        built from the same URL), so their runners of one group take turns instead of both
        handling every event. Across processes the checkpoint's compare-and-set keeps commits
        exactly-once.
        """
        key = (self.database_identity(), validate_group(group))
        lock = _GROUP_LOCKS.get(key)
        if lock is None:
            lock = asyncio.Lock()
            _GROUP_LOCKS[key] = lock
        return lock

    def database_identity(self) -> str:
        """A key naming the database behind this store (same database -> same key)."""
        return f"{type(self).__name__}:{id(self)}"

    def _notify_checkpoint(self) -> None:
        event = self._checkpoint_changed
        self._checkpoint_changed = asyncio.Event()
        event.set()

    async def wait_for(self, position: int, *, group: str, timeout: float | None = None) -> bool:
        """Wait until ``group`` has processed ``position`` (read-your-writes for read models).

        Returns True once the group's checkpoint is at or past ``position``, False on timeout.
        Checkpoints committed in this process wake the waiter at once; others are polled.
        """
        validate_position("position", position)
        validate_timeout(timeout)
        group = validate_group(group)
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            changed = self._checkpoint_changed
            if await self._load_checkpoint(group) >= position:
                return True
            wait = 0.05 if deadline is None else min(0.05, deadline - loop.time())
            if wait <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)

    # -- backend primitives -------------------------------------------------------------------------

    @abc.abstractmethod
    async def _load_checkpoint(self, group: str) -> int: ...

    @abc.abstractmethod
    async def _checkpoints(self) -> dict[str, int]: ...

    @abc.abstractmethod
    async def _set_checkpoint(self, group: str, position: int | None) -> None: ...

    @abc.abstractmethod
    async def _commit_processed(self, batch: ProcessedBatch) -> list[AppendResult]: ...

    @abc.abstractmethod
    async def _processed_ids(self, group: str, event_ids: list[uuid.UUID]) -> set[uuid.UUID]: ...

    @abc.abstractmethod
    async def _dead_letters(
        self, group: str | None, id: int | None, query: DeadLetterQuery | None = None
    ) -> list[DeadLetter]: ...

    @abc.abstractmethod
    async def _count_dead_letters(self, group: str | None) -> int: ...

    def _dead_letter_event_id(self, event_id: uuid.UUID) -> Any:
        """An event id as the backend stores it in its dead letters (a UUID unless overridden)."""
        return event_id

    @abc.abstractmethod
    async def _discard_dead_letter(self, id: int) -> bool: ...


class SQLStore(TrackingStore):
    """A :class:`TrackingStore` whose database runs SQL: projections keep their read models in it,
    in the same transaction as their checkpoints."""

    async def transaction(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn(tx)`` in one write transaction of the store's database and return its result.

        ``fn`` is synchronous and runs on the store's worker; it must not do other I/O.
        """
        if not callable(fn) or asyncio.iscoroutinefunction(fn):
            raise InvalidArgument(f"transaction() takes a synchronous function of a Tx, got {fn!r:.80}")
        self._check_open()
        return await self._transaction(fn)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only SQL query (``?`` placeholders) on the store's database: read models."""
        validate_text("SQL", sql)
        if isinstance(params, str | bytes) or not isinstance(params, Sequence | Mapping):
            raise InvalidArgument(f"query parameters must be a sequence, got {type(params).__qualname__}")
        self._check_open()
        return await self._query(sql, params)

    async def projection_generation(self, name: str) -> ProjectionGeneration | None:
        """Projection ``name``'s catalog entry; None if it was never set up."""
        rows = await self.query(
            "SELECT generation, building FROM tidings_projections WHERE name = ?", (name,)
        )
        if not rows:
            return None
        return ProjectionGeneration(name, int(rows[0][0]), None if rows[0][1] is None else int(rows[0][1]))

    async def projection_generations(self) -> list[ProjectionGeneration]:
        """Every projection's catalog entry (active generation, generation being built), by name."""
        rows = await self.query("SELECT name, generation, building FROM tidings_projections ORDER BY name")
        return [ProjectionGeneration(r[0], int(r[1]), None if r[2] is None else int(r[2])) for r in rows]

    # -- backend primitives -------------------------------------------------------------------------

    @abc.abstractmethod
    async def _transaction(self, fn: Callable[[Tx], T]) -> T: ...

    @abc.abstractmethod
    async def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]: ...


@dataclasses.dataclass(frozen=True, slots=True)
class ProjectionGeneration:
    """A projection's entry in the store's catalog: the generation serving reads, and the one a
    rebuild is building (None when no rebuild is under way)."""

    name: str
    generation: int
    building: int | None = None


def load_generation(tx: Tx, name: str) -> ProjectionGeneration | None:
    """The catalog entry of projection ``name``, read in ``tx``; None if it was never set up."""
    row = tx.fetchone("SELECT generation, building FROM tidings_projections WHERE name = ?", (name,))
    if row is None:
        return None
    return ProjectionGeneration(name, int(row[0]), None if row[1] is None else int(row[1]))


def save_generation(tx: Tx, entry: ProjectionGeneration) -> None:
    """Create or replace a projection's catalog entry in ``tx``."""
    tx.execute(
        "INSERT INTO tidings_projections (name, generation, building) VALUES (?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET generation = excluded.generation, building = excluded.building",
        (entry.name, entry.generation, entry.building),
    )


def forget_group(tx: Tx, group: str) -> None:
    """Delete a subscription group's checkpoint, inbox and dead letters in ``tx`` (a projection
    generation that was swapped out, or is about to be built afresh)."""
    for table in ("tidings_checkpoints", "tidings_inbox", "tidings_dead_letters"):
        tx.execute(f"DELETE FROM {table} WHERE group_name = ?", (group,))


def require(store: EventStore, capability: Callable[..., S], needed_by: str) -> S:
    """Return ``store`` if it has ``capability`` (:class:`TrackingStore`, :class:`SQLStore`...).

    Otherwise raise :class:`~tidings.UnsupportedOperation` naming the backend, the missing
    capability and ``needed_by`` (what needs it, e.g. ``"projections"``)::

        store = require(store, SQLStore, "projection 'balances'")
    """
    # ``capability`` is a store class; it is typed as a callable because mypy refuses abstract
    # classes where ``type[S]`` is expected (python/mypy#4717), and these classes are abstract.
    cls = cast(type, capability)
    if isinstance(store, cls):
        return cast(S, store)
    name = cls.__name__
    description, hint = _CAPABILITIES.get(name, (name, "use a backend that has it"))
    raise UnsupportedOperation(
        f"{needed_by} cannot run on {type(store).__name__} ({store.safe_url}): it lacks the {name} "
        f"capability ({description}); {hint}"
    )


_CAPABILITIES = {
    "SQLStore": (
        "SQL transactions and queries on the store's own database",
        "use sqlite:///path.db or postgresql://... instead",
    ),
    "TrackingStore": (
        "checkpoints, inbox and dead letters for subscriptions",
        "use memory://, sqlite:///path.db or postgresql://... instead",
    ),
}

# Weak values: a group's lock lives as long as some runner holds or waits for it.
_GROUP_LOCKS: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = weakref.WeakValueDictionary()


def _uuid_list(name: str, values: object) -> list[uuid.UUID]:
    if isinstance(values, str | bytes) or not isinstance(values, Iterable):
        raise InvalidArgument(f"{name} must be a list of uuid.UUID, got {type(values).__qualname__}")
    out = list(values)
    for i, value in enumerate(out):
        if not isinstance(value, uuid.UUID):
            raise InvalidArgument(f"{name}[{i}] must be a uuid.UUID, got {value!r:.80}")
    return out
