"""What a handler works with: the event's envelope, aggregates, and effects that commit exactly once.

A handler runs inside a *batch*: the subscription reads up to ``batch_size`` events, runs the
handler for each in log order, and commits every handler's effects together with the group's new
checkpoint in one transaction. Between those two moments nothing is in the database yet, so the
context keeps a :class:`BatchState`: the events each stream has gained in this batch (not yet
committed) and the aggregates loaded so far. A handler therefore sees

* the store's committed state, plus
* every effect of the handlers that ran before it in the same batch (their saved aggregates and
  emitted events),

and never a state that another handler of its batch has already moved past. That is what makes
"load the stock, check it, reserve" safe at any batch size: the second order of a batch sees the
first order's reservation, and each save is checked against the version its handler loaded, so a
writer outside the batch that got there first makes the commit fail instead of overselling.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from tidings import tracing
from tidings.aggregate import Aggregate
from tidings.commands import Command
from tidings.errors import AggregateNotFound, InvalidArgument, UnsupportedOperation
from tidings.events import Event, RecordedEvent
from tidings.repository import Repository
from tidings.store.append import ANY, AppendRequest, ExpectedVersion, validate_stream_id
from tidings.store.tracking import SQLStore, TrackingStore, Tx, require

__all__ = ["BatchState", "HandlerContext", "statements_work"]

A = TypeVar("A", bound=Aggregate)

PROPAGATED = ("user_id",)
"""Metadata keys that flow from a handled message to what its handler emits: who acted."""

REPLY_KEYS = ("saga_id", "saga_step", "compensation")
"""Metadata keys that flow from a handled *command* to the events its handler emits (the replies):
the saga and step that sent it, so that the replies find their saga, and whether it compensates a
step (so that a trace flags the replies too). Not carried further."""

SQL_EFFECTS = "\x00sql"
"""The pseudo-stream that stands for a handler's SQL statements when conflicts are traced."""


class BatchState:
    """The effects of the handlers of one batch that have run but are not committed yet.

    ``pending[stream]`` holds the events appended to ``stream`` by earlier handlers of the batch,
    in order. ``aggregates[(class, id)]`` caches an aggregate with the number of those pending
    events already applied to it, so that loading the same aggregate again costs no read. Only a
    handler that returned normally is folded in (:meth:`absorb`): a failed handler's effects are
    dropped with its context.
    """

    def __init__(self, store: TrackingStore) -> None:
        self.store = store
        self.pending: dict[str, list[Event]] = {}
        self.aggregates: dict[tuple[type[Aggregate], str], tuple[Aggregate, int]] = {}
        self._repositories: dict[type[Aggregate], Repository[Any]] = {}

    def absorb(self, ctx: HandlerContext) -> None:
        """Make ``ctx``'s effects visible to the handlers that run after it in this batch."""
        for stream_id, events in ctx.pending.items():
            self.pending.setdefault(stream_id, []).extend(events)
        self.aggregates.update(ctx.saved)

    async def aggregate(self, cls: type[A], id: str) -> tuple[A, int]:
        """The batch's copy of an aggregate (committed state, then the batch's pending events of its
        stream, all applied) and how many pending events that is. Callers must copy it."""
        key = (cls, id)
        cached = self.aggregates.get(key)
        if cached is None:
            repository = self._repositories.get(cls)
            if repository is None:
                repository = self._repositories[cls] = Repository(self.store, cls)
            try:
                fresh: Aggregate = await repository.get(id)
            except AggregateNotFound:
                fresh = cls(id)
            cached = (fresh, 0)
        aggregate, applied = cached
        pending = self.pending.get(id, ())
        if applied < len(pending):
            catch_up(aggregate, pending[applied:])
        self.aggregates[key] = (aggregate, len(pending))
        return aggregate, len(pending)  # type: ignore[return-value]


def catch_up(aggregate: Aggregate, events: Iterable[Event]) -> None:
    """Apply events that follow the aggregate's version (as a replay does: nothing is queued)."""
    for event in events:
        aggregate.apply(event)
        aggregate.version += 1


class HandlerContext:
    """What a handler gets beside its event: the envelope, aggregates, and exactly-once effects.

    **What a handler sees.** :meth:`load` returns the aggregate as committed in the store *plus*
    the effects of the handlers that ran before this one in the same batch (saved aggregates and
    emitted events, not committed yet). No handler ever works on state that its own batch has
    already changed, whatever the batch size.

    **What commits, and when.** :meth:`save`, :meth:`emit` and :meth:`execute` only record effects.
    They commit together with the subscription's checkpoint in one transaction, after the handler
    returns, so they happen exactly once. Each save is checked against the version its aggregate
    was loaded at: if another writer changed that aggregate first, the commit is refused, nothing of
    this event is written, and the event is handled again on fresh state.

    **When a handler runs again for the same event.** Outside effects (an e-mail, an HTTP call)
    happen once per delivery attempt, and an attempt is repeated only when:

    * the handler raised (it is retried per the group's :class:`~tidings.RetryPolicy`);
    * its save or emit was refused because another writer changed one of the streams it loaded or
      wrote (only the events whose effects depended on that stream run again, not the whole batch);
    * the commit failed for another reason than an outage (a SQL error, say): the batch's events
      are then handled again one at a time, so the failure is pinned on one event;
    * the process died before the commit.

    An outage of the store at commit time is waited out and the same commit is tried again, without
    running the handlers again. Use the event id (``ctx.recorded.event_id``) as the idempotency key
    of outside effects, or an inbox in the other system.

    ``attempt`` is 1 on the first delivery attempt of the event and counts up on retries.
    """

    def __init__(
        self,
        store: TrackingStore,
        recorded: RecordedEvent,
        group: str,
        attempt: int,
        batch: BatchState | None = None,
        *,
        sql: bool | None = None,
        service: str | None = None,
    ) -> None:
        self._store = store
        self._batch = batch if batch is not None else BatchState(store)
        self._sql = isinstance(store, SQLStore) if sql is None else sql
        self.recorded = recorded
        self.group = group
        self.attempt = attempt
        self.appends: list[AppendRequest] = []
        self.statements: list[tuple[str, Sequence[Any] | Mapping[str, Any]]] = []
        self.pending: dict[str, list[Event]] = {}
        self.saved: dict[tuple[type[Aggregate], str], tuple[Aggregate, int]] = {}
        self.touched: set[str] = set()
        self.service = service
        """The name of the service running the handler (stamped as ``service`` on what it emits)."""
        self.caused_by: str | None = None
        """What is running (``handler:<group>.<function>``, set by the runner; a saga sets
        ``saga:<name>``): stamped as ``caused_by`` on what it emits, for the causal trace."""
        self._trace_keys: dict[str, str] | None = None

    # -- aggregates -------------------------------------------------------------------------------

    async def load(self, cls: type[A], id: str, *, create: bool = False) -> A:
        """The aggregate ``cls`` of stream ``id``: committed state plus this batch's pending effects.

        Raises :class:`~tidings.AggregateNotFound` if the stream has no events, unless ``create``
        is true: then a new, empty aggregate (version 0) is returned, to be saved with
        :meth:`save` (get-or-create). The object is the handler's own copy; change it through its
        commands and :meth:`save` it.
        """
        if not isinstance(cls, type) or not issubclass(cls, Aggregate):
            raise InvalidArgument(f"load() takes an Aggregate subclass, got {cls!r}")
        validate_stream_id(id)
        self.touched.add(id)
        own = self.saved.get((cls, id))
        if own is not None:
            aggregate, applied = copy.deepcopy(own[0]), own[1]
        else:
            shared, applied = await self._batch.aggregate(cls, id)
            aggregate = copy.deepcopy(shared)
        # Both counts index the batch's pending events of this stream followed by this handler's.
        events = [*self._batch.pending.get(id, ()), *self.pending.get(id, ())]
        catch_up(aggregate, events[applied:])
        if aggregate.version == 0 and not create:
            raise AggregateNotFound(id)
        return aggregate  # type: ignore[return-value]

    def save(self, aggregate: Aggregate, *, metadata: Mapping[str, Any] | None = None) -> None:
        """Append the aggregate's new events when this event's processing commits.

        The append expects the version the aggregate was loaded at, so a concurrent writer is
        detected at commit. Later handlers of the batch see the saved state. The events carry the
        causation and correlation ids (see :meth:`emit`). Does nothing if nothing is pending.
        """
        if not isinstance(aggregate, Aggregate):
            raise InvalidArgument(f"save() takes an Aggregate, got {type(aggregate).__qualname__}")
        pending = aggregate.pending_events
        if not pending:
            return
        base = aggregate.version - len(pending)
        self._append(aggregate.id, pending, expected_version=base, metadata=metadata)
        aggregate.mark_saved()
        applied = len(self._batch.pending.get(aggregate.id, ())) + len(self.pending[aggregate.id])
        self.saved[(type(aggregate), aggregate.id)] = (copy.deepcopy(aggregate), applied)

    # -- effects ----------------------------------------------------------------------------------

    def emit(
        self,
        stream_id: str,
        events: Iterable[Event],
        *,
        expected_version: ExpectedVersion = ANY,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        """Append ``events`` to ``stream_id`` when this event's processing commits.

        Validated now: a bad stream id or an event that cannot be serialised raises here, at the
        handler's line, and fails the event at once (it can never succeed). The new events'
        metadata carries ``causation_id`` = the handled event's id, the handled event's
        ``correlation_id`` (or its id, if it started the conversation), and its ``user_id``,
        and, when the handled message is a command, its ``saga_id``, ``saga_step`` and
        ``compensation`` (so that the replies find their saga), and the trace context
        (``traceparent``: a child of the handled event's trace, see :mod:`tidings.tracing`).
        ``caused_by`` names the handler and ``service`` the running service, when known (see
        :mod:`tidings.causal`). Their event ids are derived from the handled event's id, so a
        redelivery can never append them twice.
        """
        if (
            events is None
            or isinstance(events, str | bytes | Mapping | Event)
            or not isinstance(events, Iterable)
        ):
            raise InvalidArgument(
                f"emit() takes a list of events, got {type(events).__qualname__} "
                "(wrap a single event in a list)"
            )
        self._append(stream_id, list(events), expected_version=expected_version, metadata=metadata)

    def _append(
        self,
        stream_id: str,
        events: list[Event],
        *,
        expected_version: ExpectedVersion,
        metadata: Mapping[str, Any] | None,
    ) -> None:
        recorded = self.recorded
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidArgument(f"metadata must be a mapping, got {type(metadata).__qualname__}")
        meta = {
            "correlation_id": recorded.correlation_id or str(recorded.event_id),
            "causation_id": str(recorded.event_id),
            **{key: recorded.metadata[key] for key in PROPAGATED if key in recorded.metadata},
            **(
                {key: recorded.metadata[key] for key in REPLY_KEYS if key in recorded.metadata}
                if isinstance(recorded.event, Command)
                else {}
            ),
            **({"caused_by": self.caused_by} if self.caused_by is not None else {}),
            **({"service": self.service} if self.service is not None else {}),
            **self._trace(),
            **(metadata or {}),
        }
        call = len(self.appends)
        ids = [_derived_id(recorded, self.group, call, i) for i in range(len(events))]
        request = self._store.prepare_append(
            stream_id, events, expected_version=expected_version, metadata=meta, event_ids=ids
        )
        self.appends.append(request)
        self.pending.setdefault(stream_id, []).extend(events)
        self.touched.add(stream_id)

    def _trace(self) -> dict[str, str]:
        # One span id per handler call, whatever it emits: the call is the span of the trace.
        if self._trace_keys is None:
            self._trace_keys = tracing.child_of(self.recorded.metadata)
        return self._trace_keys

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> None:
        """Run a write statement in the commit of this event's processing.

        ``params`` is a sequence for ``?`` placeholders or a mapping for named ones (``:name``
        on SQLite); it is copied now, so later changes to it do not leak into the statement.
        Raises :class:`~tidings.UnsupportedOperation` on a store without SQL (``memory://``).
        """
        if not self._sql:
            raise UnsupportedOperation(
                f"ctx.execute(): the store {self._store.safe_url} runs no SQL; use a SQLite or "
                "PostgreSQL store for handlers that write SQL"
            )
        if not isinstance(sql, str) or not sql.strip():
            raise InvalidArgument(f"execute() takes a non-empty SQL string, got {sql!r:.60}")
        if isinstance(params, Mapping):
            self.statements.append((sql, dict(params)))
        elif isinstance(params, Sequence) and not isinstance(params, str | bytes):
            self.statements.append((sql, tuple(params)))
        else:
            raise InvalidArgument(f"execute() params must be a sequence or a mapping, got {params!r:.60}")
        self.touched.add(SQL_EFFECTS)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Read the store's database (read models) as committed: this batch's pending SQL is not
        visible here. Raises :class:`~tidings.UnsupportedOperation` on a store without SQL."""
        return await require(self._store, SQLStore, "ctx.query()").query(sql, params)


def statements_work(contexts: Sequence[HandlerContext]) -> Callable[[Tx], None] | None:
    """The SQL the handlers of ``contexts`` recorded with ``ctx.execute``, as one function to run
    in the commit's transaction (None if there is none)."""
    statements = [s for ctx in contexts for s in ctx.statements]
    if not statements:
        return None

    def work(tx: Tx) -> None:
        for sql, params in statements:
            tx.execute(sql, params)

    return work


def _derived_id(recorded: RecordedEvent, group: str, call: int, index: int) -> uuid.UUID:
    return uuid.uuid5(recorded.event_id, f"{group}/{call}/{index}")
