"""The peer: the ``eventsourcing`` library's SQLite module, driven the way its users drive it.

Configuration used for fairness (see :data:`PEER_CONFIG`, also written into ``results.json``):

* ``PERSISTENCE_MODULE=eventsourcing.sqlite`` and ``SQLITE_DBNAME=<fresh temp file>``: its SQLite
  application recorder, one file per scenario, like tidings.
* Durability: eventsourcing puts file databases in WAL mode itself and leaves ``synchronous`` at
  SQLite's default, which for WAL is ``FULL`` in standard builds (``DEFAULT_WAL_SYNCHRONOUS=2``).
  :func:`check_durability` reads both pragmas back from the peer's own pooled connection and refuses
  to run unless they are ``wal`` / ``FULL``, the same as tidings' default.
* ``IS_SNAPSHOTTING_ENABLED=no`` and everything else at the library's defaults: JSON transcoder, no
  compression, no cipher, no aggregate cache (so a load really replays), lock timeout 5 s,
  connection pool of 5 + 10 overflow. The application ignores ``os.environ`` (see
  :class:`BenchApplication`), so a stray variable cannot change the setup.

The domain model mirrors :mod:`benchmarks.domain`: an ``Opened`` event carrying the owner and
``Deposited`` events carrying an amount and a reference, declared with eventsourcing's ``@event``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from time import perf_counter
from typing import Any, Final
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import ApplicationRecorder
from eventsourcing.utils import Environment

PEER_CONFIG: Final[dict[str, str]] = {
    "PERSISTENCE_MODULE": "eventsourcing.sqlite",
    "SQLITE_DBNAME": "<fresh temp file per scenario>",
    "IS_SNAPSHOTTING_ENABLED": "no",
}
"""The environment given to the peer's application (the database name is filled in per run)."""

PAGE_SIZE: Final = 1000
"""Notifications selected per round trip when reading the whole log (tidings also pages by 1000)."""


class EsAccount(Aggregate):
    @event("Opened")
    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.balance = 0

    @event("Deposited")
    def deposit(self, amount: int, reference: str) -> None:
        self.balance += amount


DEPOSITED: Final[type] = EsAccount.Deposited  # type: ignore[attr-defined]  # the class @event made


class BenchApplication(Application[UUID]):
    """A plain eventsourcing application whose settings come only from :data:`PEER_CONFIG`."""

    def construct_env(self, name: str, env: Any = None) -> Environment:
        return Environment(name, dict(env or {}))


def new_account(n_events: int) -> EsAccount:
    """An unsaved account holding ``n_events`` pending events: one opening, then deposits."""
    account = EsAccount(owner="owner")
    for i in range(1, n_events):
        account.deposit(amount=i, reference=f"ref-{i:08d}")
    return account


def open_app(db_path: str) -> BenchApplication:
    app = BenchApplication(env={**PEER_CONFIG, "SQLITE_DBNAME": db_path})
    check_durability(app)
    return app


def check_durability(app: BenchApplication) -> dict[str, str]:
    """Read journal mode and synchronous back from the peer's pool; raise unless WAL + FULL."""
    datastore = app.recorder.datastore  # type: ignore[attr-defined]
    with datastore.get_connection(commit=False) as conn:
        raw = conn._sqlite_conn  # the sqlite3.Connection the peer itself uses
        journal = str(raw.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        synchronous = int(raw.execute("PRAGMA synchronous").fetchone()[0])
    if journal != "wal" or synchronous != 2:
        raise RuntimeError(
            f"eventsourcing's SQLite connection has journal_mode={journal}, synchronous={synchronous}; "
            "the comparison needs wal / 2 (FULL), as tidings uses"
        )
    return {"journal_mode": journal, "synchronous": "FULL"}


def save_all(app: BenchApplication, accounts: list[EsAccount]) -> None:
    save = app.save
    for account in accounts:
        save(account)


def save_concurrently(app: BenchApplication, batches: list[list[EsAccount]]) -> float:
    """Save each batch from its own thread, all through ``app``; return the wall time in seconds.

    Threads are started first and released together, so thread start-up is not timed.
    """
    gate = threading.Barrier(len(batches) + 1)
    errors: list[BaseException] = []

    def writer(batch: list[EsAccount]) -> None:
        gate.wait()
        try:
            save_all(app, batch)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    gate.wait()
    started = perf_counter()
    for thread in threads:
        thread.join()
    elapsed = perf_counter() - started
    if errors:
        raise errors[0]
    return elapsed


def load(app: BenchApplication, account_id: UUID) -> EsAccount:
    account: EsAccount = app.repository.get(account_id)
    return account


def read_all(app: BenchApplication) -> Iterator[Any]:
    """Yield every domain event of the application's log in order, decoded by its mapper.

    The equivalent of tidings' ``read_all``: page through the recorder's notifications and turn each
    into a typed domain event.
    """
    recorder: ApplicationRecorder = app.recorder
    to_domain_event = app.mapper.to_domain_event
    start = 1
    while True:
        page = recorder.select_notifications(start, PAGE_SIZE)
        for notification in page:
            yield to_domain_event(notification)
        if len(page) < PAGE_SIZE:
            return
        start = page[-1].id + 1
