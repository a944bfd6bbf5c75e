"""Projections: read models kept in the store's database, exactly once, rebuildable blue/green.

A projection declares its tables and handles events with sync methods that write SQL through a
:class:`ProjectionTx`::

    class Balances(Projection):
        name = "balances"
        tables = {"balances": "CREATE TABLE {balances} (account TEXT PRIMARY KEY, amount INT)"}

        def deposited(self, event: Deposited, tx: ProjectionTx) -> None:
            tx.execute(
                "INSERT INTO {balances} VALUES (?, ?) ON CONFLICT (account) "
                "DO UPDATE SET amount = {balances}.amount + excluded.amount",
                (tx.recorded.stream_id, event.amount),
            )

Readers query the logical name (``SELECT * FROM balances``): it is a view over the physical
tables of the active *generation* (``balances__g1``). The checkpoint of the projection's group is
committed in the same transaction as its rows, so no row is ever applied twice.

A rebuild builds generation N+1 from the start of the log while generation N keeps serving,
then swaps the views in one transaction and drops N; a runner of N that is still live notices
the swap at its next commit and carries on with N+1 from the rebuild's checkpoint.

Each generation records the :attr:`Projection.fingerprint` of the code that built it: its tables'
DDL, the event types it handles and its optional ``version``. A runner whose projection's
fingerprint differs from the active generation's applies nothing to those tables (they no longer
fit the code, and every event would be dead-lettered): it reports ``state="failed"`` with an error
naming ``tidings projections rebuild NAME``, and resumes once a rebuild has built a generation
with the new fingerprint. Bump ``version`` when a handler's logic changes without its tables.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from tidings import tracing
from tidings.errors import InvalidArgument, ProjectionError, TidingsError, is_transient
from tidings.events import Event, RecordedEvent
from tidings.processing.handlers import Dispatch, handler_methods
from tidings.processing.retry import retry_event
from tidings.processing.status import group_status
from tidings.processing.subscription import RunnerBlocked, Subscription, SubscriptionConfig
from tidings.store.base import EventStore
from tidings.store.sqltext import split_statements
from tidings.store.tracking import (
    ProjectionGeneration,
    SQLStore,
    Tx,
    forget_group,
    load_generation,
    require,
    save_generation,
)

__all__ = [
    "Projection",
    "ProjectionStale",
    "ProjectionStatus",
    "ProjectionSubscription",
    "ProjectionTx",
    "fold",
    "projection_status",
    "rebuild_projection",
]

T = TypeVar("T")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,50}$")


class ProjectionSuperseded(TidingsError):
    """The generation a runner writes to is no longer active or being built (a rebuild swapped)."""


class ProjectionStale(ProjectionError, RunnerBlocked):
    """The projection's code (tables, handled event types, version) differs from its active
    generation's: it must be rebuilt before it is applied again."""


class ProjectionTx:
    """The transaction a projection handler writes through.

    ``execute``/``executemany``/``fetchone``/``fetchall`` take ``?`` placeholders and replace
    ``{table}`` with the physical table of the generation being written. ``recorded`` is the
    envelope of the event being applied (stream id, position, metadata ...).
    """

    def __init__(self, tx: Tx, tables: Mapping[str, str]) -> None:
        self._tx = tx
        self._tables = dict(tables)
        self.dialect = tx.dialect
        self._recorded: RecordedEvent | None = None
        self._translated: dict[str, str] = {}

    @property
    def recorded(self) -> RecordedEvent:
        """The envelope of the event being applied (stream id, position, metadata ...)."""
        if self._recorded is None:
            raise ProjectionError("tx.recorded is only available while an event is being applied")
        return self._recorded

    def table(self, name: str) -> str:
        """The physical name of the declared table ``name``."""
        try:
            return self._tables[name]
        except KeyError:
            raise ProjectionError(f"table {name!r} is not declared by this projection") from None

    def sql(self, sql: str) -> str:
        """``sql`` with each ``{table}`` replaced by its physical name (memoised per statement)."""
        done = self._translated.get(sql)
        if done is None:
            done = sql
            for name, physical in self._tables.items():
                done = done.replace("{" + name + "}", physical)
            self._translated[sql] = done
        return done

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        return self._tx.execute(self.sql(sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        return self._tx.executemany(self.sql(sql), rows)

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        return self._tx.fetchone(self.sql(sql), params)

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._tx.fetchall(self.sql(sql), params)


class Projection:
    """Base class of SQL read models. Set ``name`` and ``tables``; write handler methods.

    A handler method's first parameter is annotated with the event class it handles; the second
    is the :class:`ProjectionTx`. Handlers must only touch the database through ``tx``: they run
    inside the store's transaction, on its worker.
    """

    name: ClassVar[str]
    tables: ClassVar[Mapping[str, str]] = {}
    stream_prefix: ClassVar[str | None] = None
    version: ClassVar[int | str | None] = None
    """Bump it when handlers change what they write without a change to ``tables``: the
    projection's fingerprint changes, and the runner asks for a rebuild."""

    def __init__(self) -> None:
        name = getattr(type(self), "name", None)
        if not isinstance(name, str) or not _IDENT.match(name):
            raise ProjectionError(
                f"{type(self).__qualname__}.name must be an identifier ([A-Za-z_][A-Za-z0-9_]*), got {name!r}"
            )
        for table, ddl in self.tables.items():
            if not _IDENT.match(table) or "{" + table + "}" not in ddl:
                raise ProjectionError(
                    f"projection {name!r}: table {table!r} must be an identifier and its DDL must "
                    f"create {{{table}}}"
                )
        self.dispatch = Dispatch(handler_methods(self))
        if not self.dispatch.table:
            raise ProjectionError(f"projection {name!r} has no handler methods")
        for fn in self.dispatch.table.values():
            if inspect.iscoroutinefunction(fn):
                raise ProjectionError(
                    f"projection {name!r}: {fn.__qualname__} is async; projection handlers are "
                    "synchronous (they run inside the store's transaction)"
                )

    def apply(self, tx: ProjectionTx, recorded: RecordedEvent) -> None:
        """Apply one recorded event (dispatches by type; unknown types are ignored)."""
        fn = self.dispatch.find(recorded.event)
        if fn is not None:
            tx._recorded = recorded
            fn(recorded.event, tx)

    @property
    def fingerprint(self) -> str:
        """A digest of what the stored tables depend on: each table's DDL (whitespace
        normalised), the handled event types, and ``version``."""
        definition = {
            "tables": {name: _normalised(ddl) for name, ddl in sorted(self.tables.items())},
            "handles": sorted(self.dispatch.type_names),
            "version": self.version,
        }
        text = json.dumps(definition, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def physical(self, generation: int) -> dict[str, str]:
        return {table: f"{table}__g{generation}" for table in self.tables}

    @property
    def group_prefix(self) -> str:
        return f"projection:{self.name}"

    def group(self, generation: int) -> str:
        return f"{self.group_prefix}:g{generation}"


def _normalised(ddl: str) -> str:
    """``ddl`` with layout removed: runs of whitespace made one space, none around punctuation."""
    return _PUNCTUATION_SPACE.sub(r"\1", " ".join(ddl.split()))


_PUNCTUATION_SPACE = re.compile(r"\s*([(),;])\s*")


# -- generations (run inside store transactions) ---------------------------------------------------


_FINGERPRINT_COLUMNS = ("fingerprint", "code_fingerprint")


def _ensure_fingerprint_columns(tx: Tx) -> None:
    """Add the fingerprint columns to ``tidings_projections`` if this database predates them.

    ``fingerprint`` is the active generation's; ``code_fingerprint`` that of the code whose
    runner started last (so that status can tell, without the code, that a rebuild is needed).
    """
    if tx.dialect == "postgresql":
        rows = tx.fetchall(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'tidings_projections'"
        )
        have = {str(r[0]) for r in rows}
        for column in _FINGERPRINT_COLUMNS:
            if column not in have:
                # IF NOT EXISTS: another process may have added it since the check.
                tx.execute(f"ALTER TABLE tidings_projections ADD COLUMN IF NOT EXISTS {column} TEXT")
    else:
        have = {str(r[1]) for r in tx.fetchall("PRAGMA table_info(tidings_projections)")}
        for column in _FINGERPRINT_COLUMNS:
            if column not in have:
                tx.execute(f"ALTER TABLE tidings_projections ADD COLUMN {column} TEXT")


def _generation_row(tx: Tx, name: str) -> tuple[int, int | None] | None:
    entry = load_generation(tx, name)
    return None if entry is None else (entry.generation, entry.building)


def _create_tables(tx: Tx, projection: Projection, generation: int) -> None:
    ptx = ProjectionTx(tx, projection.physical(generation))
    for table, ddl in projection.tables.items():
        tx.execute(f"DROP TABLE IF EXISTS {ptx.table(table)}")
        for statement in split_statements(ddl, tx.dialect):
            if statement.strip():
                ptx.execute(statement)


def _point_views(tx: Tx, projection: Projection, generation: int) -> None:
    for table, physical in projection.physical(generation).items():
        tx.execute(f"DROP VIEW IF EXISTS {table}")
        tx.execute(f"CREATE VIEW {table} AS SELECT * FROM {physical}")


def _ensure(tx: Tx, projection: Projection) -> int:
    _ensure_fingerprint_columns(tx)
    row = _generation_row(tx, projection.name)
    if row is not None:
        # A generation built before fingerprints existed is taken to match the code now running.
        tx.execute(
            "UPDATE tidings_projections SET fingerprint = ? WHERE name = ? AND fingerprint IS NULL",
            (projection.fingerprint, projection.name),
        )
        return row[0]
    _create_tables(tx, projection, 1)
    _point_views(tx, projection, 1)
    tx.execute(
        "INSERT INTO tidings_projections (name, generation, building, fingerprint) VALUES (?, 1, NULL, ?)",
        (projection.name, projection.fingerprint),
    )
    return 1


def _ensure_current(tx: Tx, projection: Projection) -> tuple[int, str]:
    """The active generation and its fingerprint; records the running code's fingerprint."""
    generation = _ensure(tx, projection)
    row = tx.fetchone("SELECT fingerprint FROM tidings_projections WHERE name = ?", (projection.name,))
    assert row is not None
    tx.execute(
        "UPDATE tidings_projections SET code_fingerprint = ? WHERE name = ?",
        (projection.fingerprint, projection.name),
    )
    return generation, str(row[0])


def _forget_generation(tx: Tx, projection: Projection, generation: int) -> None:
    """Drop a generation that no longer serves: its tables, checkpoint, dead letters and inbox."""
    for physical in projection.physical(generation).values():
        tx.execute(f"DROP TABLE IF EXISTS {physical}")
    forget_group(tx, projection.group(generation))


def _check_generation(tx: Tx, projection: Projection, generation: int) -> None:
    row = _generation_row(tx, projection.name)
    if row is None or generation not in row:
        raise ProjectionSuperseded(
            f"projection {projection.name!r}: generation {generation} is no longer active"
        )


class ProjectionSubscription(Subscription):
    """Runs a :class:`Projection` over the log, in batches, each committed with its checkpoint.

    Needs a :class:`~tidings.store.SQLStore`; any other store raises
    :class:`~tidings.UnsupportedOperation` here, before anything runs.
    """

    def __init__(
        self,
        store: EventStore,
        projection: Projection,
        *,
        generation: int | None = None,
        config: SubscriptionConfig | None = None,
    ) -> None:
        self.sql_store = require(store, SQLStore, f"projection {projection.name!r}")
        super().__init__(
            self.sql_store,
            projection.group(generation or 1),
            event_types=projection.dispatch.type_names,
            stream_prefix=projection.stream_prefix,
            config=config,
        )
        self.projection = projection
        self.generation = generation
        self._fixed = generation is not None

    @property
    def lease_name(self) -> str:
        # One lease for the projection, whichever generation is active.
        return self.projection.group_prefix

    async def prepare(self) -> None:
        """Create the projection's first generation if needed and find the active one.

        Raises :class:`ProjectionStale` (the runner then applies nothing and reports it) if the
        active generation was built by code with another fingerprint.
        """
        if self._fixed:
            return
        projection = self.projection
        generation, stored = await self.sql_store.transaction(lambda tx: _ensure_current(tx, projection))
        self.generation = generation
        self.group = projection.group(generation)
        if stored != projection.fingerprint:
            raise ProjectionStale(
                f"projection {projection.name!r} changed since its generation {generation} was built "
                f"(tables, handled event types or version; fingerprint {stored} -> "
                f"{projection.fingerprint}); nothing is applied to the old tables until it is "
                f"rebuilt: run 'tidings projections rebuild {projection.name} --app MODULE:SERVICE'"
            )

    async def on_conflict(self) -> None:
        await self.prepare()

    def _work(self, events: Sequence[RecordedEvent]) -> Callable[[Tx], None]:
        projection, generation = self.projection, self.generation
        assert generation is not None
        tables = projection.physical(generation)

        def work(tx: Tx) -> None:
            _check_generation(tx, projection, generation)
            ptx = ProjectionTx(tx, tables)
            for index, recorded in enumerate(events):
                try:
                    projection.apply(ptx, recorded)
                except Exception as exc:
                    if is_transient(exc):
                        raise  # the database is away or locked: the runner waits, no attempt spent
                    raise _EventFailed(index, exc) from exc

        return work

    async def process_batch(self, events: list[RecordedEvent], scanned_to: int) -> None:
        try:
            with tracing.projection_span(self.group, events):
                await self._apply(events, scanned_to)
        except ProjectionSuperseded:
            if self._fixed:
                raise
            await self.prepare()
            self.checkpoint = await self.store.load_checkpoint(self.group)

    async def _apply(self, events: list[RecordedEvent], scanned_to: int) -> None:
        while True:
            try:
                await self.commit_patiently(scanned_to, work=self._work(events))
            except _EventFailed as failed:
                bad = events[failed.index]
                if failed.index:
                    await self.commit_patiently(
                        events[failed.index - 1].position, work=self._work(events[: failed.index])
                    )
                    self.handled += failed.index
                if not await self._retry_one(bad, failed.error):
                    return
                events = events[failed.index + 1 :]
                continue
            self.handled += len(events)
            return

    async def _retry_one(self, recorded: RecordedEvent, error: BaseException) -> bool:
        """Retry one failing event with backoff, then dead-letter it. False if asked to stop
        while waiting (nothing committed: the event is applied after the restart)."""

        async def attempt(number: int) -> None:
            try:
                await self.commit_patiently(recorded.position, work=self._work([recorded]))
            except _EventFailed as failed:
                raise failed.error from None
            self.handled += 1

        async def park(error: BaseException, attempts: int) -> None:
            await self.commit_patiently(
                recorded.position,
                dead_letters=[self.dead_letter_record(recorded, error, attempts)],
                work=self._work([]),
            )

        return await retry_event(self, self.config.retry, error, attempt, park) is not None

    def park_work(self) -> Callable[[Tx], None]:
        return self._work([])

    async def reprocess(self, recorded: RecordedEvent, dead_letter_id: int) -> bool:
        try:
            await self.commit(self.checkpoint, work=self._work([recorded]), remove_dead_letter=dead_letter_id)
        except _EventFailed as failed:
            await self.commit(
                self.checkpoint,
                dead_letters=[self.dead_letter_record(recorded, failed.error, 1)],
                work=self._work([]),
            )
            return False
        return True


class _EventFailed(TidingsError):
    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"event {index} of the batch failed: {error!r}")
        self.index = index
        self.error = error


# -- operations ------------------------------------------------------------------------------------


async def rebuild_projection(
    store: EventStore,
    projection: Projection,
    *,
    config: SubscriptionConfig | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Rebuild ``projection`` from the whole log, blue/green; return the new generation.

    ``progress(position, head)`` is called as the replay goes (after each batch).

    The active generation keeps serving reads (and, in a running service, keeps being updated)
    until the new one has caught up with the head; then the views swap to the new tables in one
    transaction and the old tables are dropped.

    Raises :class:`ProjectionError` if a rebuild is already under way, unless ``force``: then this
    one takes over, dropping what the other had built, under a generation number of its own (so a
    builder still running elsewhere fails at its next commit rather than mixing its rows in).
    """

    def begin(tx: Tx) -> tuple[int, int]:
        current = _ensure(tx, projection)
        row = _generation_row(tx, projection.name)
        abandoned = None if row is None else row[1]
        if abandoned is not None and not force:
            raise ProjectionError(
                f"projection {projection.name!r} is already being rebuilt (generation {abandoned}); "
                "if that rebuild was abandoned, rebuild with force=True (--force) to take over"
            )
        # A forced rebuild builds a generation of its own, past the one it takes over: should the
        # builder of that one still be running somewhere, its next commit fails (its generation is
        # neither active nor being built) instead of writing into this rebuild's tables.
        new = max(current, abandoned or 0) + 1
        if abandoned is not None:
            _forget_generation(tx, projection, abandoned)
        _create_tables(tx, projection, new)
        save_generation(tx, ProjectionGeneration(projection.name, current, building=new))
        forget_group(tx, projection.group(new))
        return current, new

    sql_store = require(store, SQLStore, f"projection {projection.name!r}")
    old, new = await sql_store.transaction(begin)
    builder = ProjectionSubscription(sql_store, projection, generation=new, config=config)
    # Catch up repeatedly: events keep arriving while we build.
    while True:
        reached = await builder.run_until_caught_up(progress)
        if reached >= await store.head():
            break

    def swap(tx: Tx) -> None:
        row = _generation_row(tx, projection.name)
        if row != (old, new):
            raise ProjectionError(
                f"projection {projection.name!r} changed during the rebuild (now {row}); not swapped"
            )
        _point_views(tx, projection, new)
        tx.execute(
            "UPDATE tidings_projections SET generation = ?, building = NULL, fingerprint = ? WHERE name = ?",
            (new, projection.fingerprint, projection.name),
        )
        # The old generation's parked events were replayed into the new one (and parked again
        # there if they still fail), so its tables, checkpoint, dead letters and inbox are moot.
        _forget_generation(tx, projection, old)

    await sql_store.transaction(swap)
    return new


@dataclasses.dataclass(frozen=True, slots=True)
class ProjectionStatus:
    """A projection's generation, whether a rebuild is under way, how far it has got, and who
    runs it.

    ``state`` is ``"rebuilding gN"`` while a rebuild builds generation N, ``"rebuild needed"``
    when the code's fingerprint differs from the active generation's (its runner applies
    nothing meanwhile), else the state of its group (``live``, ``catching up``, ``failed``,
    ``stopped``; see :class:`~tidings.processing.status.GroupStatus`). ``dead_letters`` counts
    the active generation's parked events.
    """

    name: str
    generation: int
    building: int | None
    checkpoint: int
    head: int
    lag: int
    state: str = "stopped"
    fingerprint: str | None = None
    code_fingerprint: str | None = None
    needs_rebuild: bool = False
    dead_letters: int = 0
    holder: str | None = None
    heartbeat_at: datetime | None = None
    last_error: str | None = None


_STATUS_ROWS = (
    "SELECT name, generation, building, fingerprint, code_fingerprint FROM tidings_projections ORDER BY name"
)


def _projection_rows(tx: Tx) -> list[tuple[Any, ...]]:
    _ensure_fingerprint_columns(tx)
    return tx.fetchall(_STATUS_ROWS)


async def projection_status(
    store: EventStore, projections: Sequence[Projection] = ()
) -> list[ProjectionStatus]:
    """Status of every projection known to the store's database.

    Whether a rebuild is needed is judged against ``projections`` (the code) when given, else
    against the fingerprint of the code whose runner started last.
    """
    code = {p.name: p.fingerprint for p in projections}
    sql_store = require(store, SQLStore, "projection status")
    try:
        rows = await sql_store.query(_STATUS_ROWS)
    except TidingsError as exc:
        if is_transient(exc):
            raise
        # A database from before fingerprints: add the columns (a write), then read.
        rows = await sql_store.transaction(_projection_rows)
    groups = {g.group: g for g in await group_status(sql_store)}
    out = []
    for name, generation, building, fingerprint, ran in rows:
        group = groups.get(f"projection:{name}:g{generation}")
        wanted = code.get(name, ran)
        needs_rebuild = wanted is not None and fingerprint is not None and wanted != fingerprint
        if building is not None:
            state = f"rebuilding g{building}"
        elif needs_rebuild:
            state = "rebuild needed"
        else:
            state = "stopped" if group is None else group.state
        checkpoint = 0 if group is None else group.checkpoint
        head = await store.head() if group is None else group.head
        out.append(
            ProjectionStatus(
                name,
                generation,
                building,
                checkpoint,
                head,
                max(0, head - checkpoint),
                state,
                fingerprint,
                wanted,
                needs_rebuild,
                0 if group is None else group.dead_letters,
                None if group is None else group.holder,
                None if group is None else group.heartbeat_at,
                None if group is None else group.last_error,
            )
        )
    return out


async def fold(
    store: EventStore,
    fn: Callable[[T, RecordedEvent], T],
    initial: T,
    *,
    stream_id: str | None = None,
    until_position: int | None = None,
    event_types: Sequence[str | type[Event]] | None = None,
    stream_prefix: str | None = None,
) -> T:
    """Compute a value on demand by folding events: state as of any position ("time travel").

    With ``stream_id`` folds that stream, otherwise the global log (optionally filtered);
    ``until_position`` stops after that global position.
    """
    if until_position is not None and until_position < 0:
        raise InvalidArgument(f"until_position must be >= 0, got {until_position}")
    value = initial
    if stream_id is not None:
        source = store.read_stream(stream_id)
    else:
        source = store.read_all(event_types=event_types, stream_prefix=stream_prefix)
    async for recorded in source:
        if until_position is not None and recorded.position > until_position:
            break
        value = fn(value, recorded)
    return value
