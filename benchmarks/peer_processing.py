"""The peer's processing paths on SQLite: a projection into a read model, and a live follower.

**Projection (read model + tracking).** eventsourcing 9.5's idiom for a read model is
:class:`eventsourcing.projection.Projection` writing through a *materialised view* -- a
``TrackingRecorder`` subclass whose methods change the view's table and record the ``Tracking``
(application name, notification id) in one transaction -- run by
:class:`eventsourcing.projection.ProjectionRunner`, which subscribes to the application's recorder
(a pull thread selecting notifications 500 at a time into a queue, and a processing thread calling
``process_event`` once per event). :class:`BalancesView` and :class:`BalancesProjection` are that
idiom, with the same upserts as the tidings projection.

The API is one ``process_event(domain_event, tracking)`` per event, so the peer commits **one
transaction per event** (each flushed, at ``synchronous=FULL``); there is no batching hook in the
Projection API. :func:`run_batched_view` is the fastest way around it by hand -- the same view
class, one transaction and one tracking record per page of 500 notifications -- and is reported as
a second, informational reference.

eventsourcing's SQLite application recorder does not implement ``subscribe()`` (only POPO and
PostgreSQL do), so the runner cannot start on SQLite as shipped. :class:`SubscribableSQLiteRecorder`
adds it by returning eventsourcing's own generic pull-thread subscription
(``ListenNotifySubscription``, the base of its PostgreSQL subscription) -- without a LISTEN thread,
which catch-up does not need. It is selected with the library's ``APPLICATION_RECORDER_TOPIC``
setting; nothing else is changed.

**Live follower.** eventsourcing's in-process path from a write to a reaction is the ``system``
module: a leader application prompts its followers when it has saved events; a
:class:`~eventsourcing.system.MultiThreadedRunner` runs each follower (a ``ProcessApplication``)
in its own thread, which pulls the new notifications and calls its ``policy``, then records the
tracking. That is what :func:`follower_latencies` measures, the same way as for tidings.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from time import perf_counter
from typing import Any, ClassVar, Final
from uuid import UUID

from eventsourcing.application import ProcessingEvent
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import ListenNotifySubscription, Subscription, Tracking
from eventsourcing.projection import Projection, ProjectionRunner
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteTrackingRecorder
from eventsourcing.system import MultiThreadedRunner, ProcessApplication, System
from eventsourcing.utils import Environment, get_topic

from benchmarks.harness import settle
from benchmarks.peer_eventsourcing import (
    DEPOSITED,
    PEER_CONFIG,
    BenchApplication,
    EsAccount,
    check_durability,
)

OPENED: Final[type] = EsAccount.Opened  # type: ignore[attr-defined]  # the class @event made
SELECT_LIMIT: Final = 500
"""Notifications per select: what eventsourcing's subscription uses (tidings' batch is 500 too)."""

_CREATE = (
    "CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, owner TEXT NOT NULL, "
    "balance INTEGER NOT NULL, deposits INTEGER NOT NULL)"
)
UPSERT_OPENED: Final = (
    "INSERT INTO balances (account, owner, balance, deposits) VALUES (?, ?, 0, 0) "
    "ON CONFLICT (account) DO UPDATE SET owner = excluded.owner"
)
UPSERT_DEPOSITED: Final = (
    "INSERT INTO balances (account, owner, balance, deposits) VALUES (?, '', ?, 1) "
    "ON CONFLICT (account) DO UPDATE SET balance = balances.balance + excluded.balance, "
    "deposits = balances.deposits + 1"
)


class SubscribableSQLiteRecorder(SQLiteApplicationRecorder):
    """eventsourcing's SQLite application recorder plus ``subscribe()`` (see the module docstring)."""

    def subscribe(self, gt: int | None = None, topics: Sequence[str] = ()) -> Subscription[Any]:
        return ListenNotifySubscription(recorder=self, gt=gt, topics=topics)


class BalancesView(SQLiteTrackingRecorder):
    """The materialised view: one row per account; each method is one transaction with its tracking."""

    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), _CREATE]

    def opened(self, account: str, owner: str, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.execute(UPSERT_OPENED, (account, owner))
            self._insert_tracking(c, tracking)

    def deposited(self, account: str, amount: int, tracking: Tracking) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.execute(UPSERT_DEPOSITED, (account, amount))
            self._insert_tracking(c, tracking)

    def apply_page(self, rows: list[tuple[str, str, Any]], tracking: Tracking) -> None:
        """Hand-batched: a page of upserts and its last tracking record in one transaction."""
        with self.datastore.transaction(commit=True) as c:
            for kind, account, value in rows:
                c.execute(UPSERT_OPENED if kind == "o" else UPSERT_DEPOSITED, (account, value))
            self._insert_tracking(c, tracking)

    def totals(self) -> tuple[int, int]:
        with self.datastore.transaction(commit=False) as c:
            c.execute("SELECT count(*), coalesce(sum(balance), 0) FROM balances")
            row = c.fetchone()
            return int(row[0]), int(row[1])


class BalancesProjection(Projection[BalancesView]):
    """Dispatches by event class (``singledispatchmethod``, the library's idiom).

    ``target`` and ``done`` are set on a fresh subclass per run (:func:`projection_class`): the
    thread that applies the last event stamps the time, so the runner's polling ``wait()`` (100 ms
    and more between polls) does not blur the measurement.
    """

    name = "balances"
    topics = (get_topic(OPENED), get_topic(DEPOSITED))
    target: ClassVar[int] = 0
    done: ClassVar[threading.Event]
    finished: ClassVar[list[float]]

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.insert_tracking(tracking)
        self._check_done(tracking)

    @process_event.register(OPENED)
    def opened(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.opened(domain_event.originator_id.hex, domain_event.owner, tracking)
        self._check_done(tracking)

    @process_event.register(DEPOSITED)
    def deposited(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.deposited(domain_event.originator_id.hex, domain_event.amount, tracking)
        self._check_done(tracking)

    def _check_done(self, tracking: Tracking) -> None:
        if tracking.notification_id >= self.target:
            type(self).finished.append(perf_counter())
            self.done.set()


def projection_class(target: int) -> type[BalancesProjection]:
    return type(
        "BalancesProjection",
        (BalancesProjection,),
        {"name": "balances", "target": target, "done": threading.Event(), "finished": []},
    )


def projection_env(db_path: str) -> dict[str, str]:
    return {
        **PEER_CONFIG,
        "SQLITE_DBNAME": db_path,
        "APPLICATION_RECORDER_TOPIC": get_topic(SubscribableSQLiteRecorder),
    }


def run_projection(db_path: str, head: int, timeout: float = 600.0) -> tuple[float, tuple[int, int]]:
    """Catch a new projection up with notification ``head``; return (seconds, view totals).

    Timed from constructing the runner (it starts the application, the view and its threads) to
    the moment the last event's transaction has committed.
    """
    cls = projection_class(head)
    settle()
    started = perf_counter()
    runner = ProjectionRunner(
        application_class=BenchApplication,
        projection_class=cls,
        view_class=BalancesView,
        env=projection_env(db_path),
    )
    with runner:
        if not cls.done.wait(timeout):
            raise TimeoutError(f"eventsourcing's projection did not reach {head} in {timeout} s")
        elapsed = cls.finished[0] - started
        check_durability(runner.app)
        totals = runner.projection.view.totals()
    return elapsed, totals


def run_batched_view(db_path: str, head: int) -> tuple[float, tuple[int, int]]:
    """The same view, driven by hand: one transaction per page of notifications (not the API)."""
    app = BenchApplication(env=projection_env(db_path))
    view = BalancesView(app.factory.datastore)  # type: ignore[attr-defined]  # the SQLite factory's
    view.create_table()
    recorder = app.recorder
    to_domain_event = app.mapper.to_domain_event
    name = app.name
    topics = BalancesProjection.topics
    try:
        check_durability(app)
        settle()
        started = perf_counter()
        last = view.max_tracking_id(name) or 0
        while last < head:
            page = recorder.select_notifications(last, SELECT_LIMIT, topics=topics, inclusive_of_start=False)
            rows: list[tuple[str, str, Any]] = []
            for notification in page:
                event = to_domain_event(notification)
                if isinstance(event, DEPOSITED):
                    rows.append(("d", event.originator_id.hex, event.amount))  # type: ignore[attr-defined]
                else:
                    rows.append(("o", event.originator_id.hex, event.owner))  # type: ignore[attr-defined]
            last = page[-1].id
            view.apply_page(rows, Tracking(name, last))
        elapsed = perf_counter() - started
        return elapsed, view.totals()
    finally:
        app.close()


# -- live follower -----------------------------------------------------------------------------------


class LatencySource(BenchApplication):
    """The leader: deposits are saved here."""

    name = "LatencySource"


class LatencyFollower(ProcessApplication[UUID]):
    """The follower: its policy is the handler whose start time is measured."""

    name = "LatencyFollower"
    seen: ClassVar[list[float]] = []
    arrived: ClassVar[threading.Event] = threading.Event()
    processed: ClassVar[threading.Event] = threading.Event()

    def construct_env(self, name: str, env: Any = None) -> Environment:
        return Environment(name, dict(env or {}))

    def policy(
        self, domain_event: DomainEventProtocol[UUID], processing_event: ProcessingEvent[UUID]
    ) -> None:
        self.seen.append(perf_counter())
        self.arrived.set()

    def process_event(self, domain_event: DomainEventProtocol[UUID], tracking: Tracking) -> None:
        super().process_event(domain_event, tracking)  # the policy, then the tracking commit
        self.processed.set()


def follower_latencies(source_db: str, follower_db: str, warmup: int, count: int) -> list[float]:
    """Save ``warmup + count`` deposits one at a time, each after the follower handled the last.

    Returns the ``count`` measured latencies in seconds: from just before ``save`` to the start
    of the follower's ``policy`` for that event.
    """
    env = {
        **PEER_CONFIG,
        "LATENCYSOURCE_SQLITE_DBNAME": source_db,
        "LATENCYFOLLOWER_SQLITE_DBNAME": follower_db,
        "SQLITE_DBNAME": source_db,
    }
    system = System(pipes=[[LatencySource, LatencyFollower]])
    runner: MultiThreadedRunner[UUID] = MultiThreadedRunner(system, env=env)
    runner.start()
    try:
        source = runner.get(LatencySource)
        follower = runner.get(LatencyFollower)
        check_durability(source)
        check_durability(follower)  # type: ignore[arg-type]
        LatencyFollower.seen = []
        LatencyFollower.processed.clear()
        account = EsAccount(owner="latency")
        source.save(account)
        if not LatencyFollower.processed.wait(10):
            raise TimeoutError("eventsourcing's follower did not process the opening event")
        latencies: list[float] = []
        for i in range(warmup + count):
            LatencyFollower.arrived.clear()
            LatencyFollower.processed.clear()
            before = len(LatencyFollower.seen)
            account.deposit(amount=i, reference=f"ref-{i:08d}")
            started = perf_counter()
            source.save(account)
            if not LatencyFollower.arrived.wait(10):
                raise TimeoutError("eventsourcing's follower did not handle a deposit within 10 s")
            if i >= warmup:
                latencies.append(LatencyFollower.seen[before] - started)
            # Let the follower commit its tracking record before the next save, as for tidings.
            if not LatencyFollower.processed.wait(10):
                raise TimeoutError("eventsourcing's follower did not commit its tracking within 10 s")
        return latencies
    finally:
        runner.stop()
