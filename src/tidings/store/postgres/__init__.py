"""The PostgreSQL event store (``postgresql://user@host/db``), for many processes and machines.

Install with ``pip install 'tidings[postgres]'`` (psycopg 3 and psycopg-pool). URL options, next to
libpq's own (``sslmode``, ``application_name``, ...):

* ``schema=NAME`` -- the PostgreSQL schema holding the tables (default ``public``); stores in
  different schemas of one database do not see each other;
* ``migrate=false`` -- do not create or migrate the tables on open (run ``tidings db migrate``);
* ``poll_interval=SECONDS`` -- the backstop for lost notifications (default 0.5);
* ``pool_size=N`` -- most connections this store opens (default 10), plus one for LISTEN;
* ``pool_timeout=SECONDS`` -- how long an operation waits for a connection (default 30), e.g.
  while the server restarts.

libpq's options are passed on as libpq reads a URL: percent-decoded, ``+`` is a plus sign, so write a
space as ``%20`` (``options=-c%20statement_timeout%3D5000``). ``connect_timeout`` defaults to 10
seconds (unless the URL or ``PGCONNECT_TIMEOUT`` sets it): a server that accepts connections but
never answers fails :meth:`~EventStore.open` with :class:`~tidings.StoreUnavailable` after that long,
instead of after the operating system's TCP timeout (minutes).

Server settings
===============

* **JIT** is turned off in every session the store opens (``SET jit = off``: pooled connections,
  the LISTEN connection, migrations), whatever ``jit`` and ``jit_above_cost`` say on the server.
  The group-commit INSERT's cost estimate exceeds the default ``jit_above_cost``; on a JIT-capable
  server (Debian's packages, most managed services) it was compiled on every call: ~95 ms per append.
  Projection and query SQL inherit the setting; ``SET LOCAL jit = on`` re-enables it for one
  transaction.
* **max_connections**: a store uses up to ``pool_size`` pooled connections plus one for LISTEN; every
  process opens its own store. Keep ``processes x (pool_size + 1)`` below ``max_connections``.
* **idle_in_transaction_session_timeout** and TCP keepalives bound how long a vanished client can
  hold the position counter (see the end of this docstring).
* Poolers in transaction mode (PgBouncer) lose LISTEN and session settings: use session mode.

The gap problem, and why commit order equals position order here
=================================================================

A reader of the global log remembers the last position it processed and asks for what comes after
it. If positions came from a sequence, a transaction holding position 10 could commit after one
holding 11; a reader that saw 11 would move past 10 and never see it. tidings must never skip.

There are two known cures. One lets writers commit in any order and makes readers stop below a
*safe high-water mark* (rows carry ``pg_current_xact_id()``; readers return only rows older than
``pg_snapshot_xmin(pg_current_snapshot())``). It commits in parallel, but a sequence burns numbers
on every rollback (a rejected append must not consume a position: the contract's positions are
1, 2, 3, ...), one long transaction anywhere in the database -- a report, a migration, ``psql`` left
open -- holds every reader back, and readers pay for the check on every page.

This store uses the other cure: **commit order equals position order**. Positions are taken from a
one-row counter (``tidings_head``) by ``UPDATE ... RETURNING``, which row-locks it until the
transaction ends. The next appender's ``UPDATE`` waits for that commit and then reads the new
value, so positions are assigned and become visible strictly in order, with no gaps: a rolled back
append releases the lock without having changed the counter. Readers need no high-water mark at all
-- a plain ``WHERE position > $after ORDER BY position`` can never see N+1 before N -- and
``head()`` is a one-row read of the counter.

The price is that appends to one schema commit one at a time. Two things make that cheap:

* **Group commit.** Each store has one writer task. Appends made concurrently in the process queue
  up and are written together: one round trip reads the current versions of every stream in the
  batch (and any explicit event ids), the shared rules of :func:`~tidings.store.append.plan_appends` run in
  Python, and a *single* ``INSERT ... SELECT FROM unnest(...)`` statement takes the counter, inserts
  all events of all accepted appends, ``pg_notify``-s the listeners and commits. Eight tasks
  appending ten events each cost two round trips and one commit, not eight of each.
* **The lock is held by the server alone.** Versions are read *before* the counter is locked, and
  the insert statement runs in autocommit mode, so the counter stays locked only for the time the
  server needs to execute that one statement and flush its commit -- never across a network round
  trip, never while a client process is descheduled. If the versions read were stale (another
  process appended to one of the streams in between), the unique indexes on ``(stream_id,
  version)`` and ``event_id`` reject the insert and nothing is written; the batch is then redone in
  one transaction that locks the counter *first*, so its reads cannot be stale.

What this costs: across processes, appends to one schema are bounded by one commit -- one WAL
flush -- at a time (on a 2-core test machine, CPU runs out first). Within a process, group commit
amortises the flush over every append waiting. Turning ``synchronous_commit`` off inside the lock
would release it before the flush, but readers could then see, and act on, events that a crash
takes back and whose positions a later append reuses; tidings does not trade that away. Schemas are
independent (each has its own counter), except that PostgreSQL serialises the commit step of
NOTIFY-ing transactions database-wide.

Appends that share a transaction with other work (a subscription step that emits events with its
checkpoint, :meth:`~EventStore.commit_processed`) lock the counter and hold it until that
transaction commits; the work itself (a projection's writes) runs before the lock is taken.
Synchronous projection code (:class:`~tidings.store.tracking.Tx`) runs in a worker thread whose
statements are executed on the event loop, on the transaction's connection
(:mod:`tidings.store.postgres.tx`).

Live delivery: every append transaction ``pg_notify``-s a per-schema channel; one dedicated
connection per store LISTENs and wakes :meth:`~EventStore.wait_for_append` waiters. Notifications
are only a wake-up: a task also polls the head every ``poll_interval`` seconds, so a notification
lost to a dropped connection or a restarted server delays delivery by at most that long, and the
listener reconnects on its own.

Connections come from a psycopg pool. A broken connection (server restart, failover) is replaced:
reads are retried once on a fresh connection; an append whose connection broke while it was being
committed is re-sent as an exact retry of itself (by its event ids), so it is stored exactly once
whether or not the first attempt reached the server. When the listener reconnects after losing
its connection, the pool is replaced by a fresh one, so that the store does not sit out the pool's
exponential reconnection backoff after the server is back.

A client that dies while holding the counter (only possible inside a multi-statement transaction)
blocks other appenders until the server notices the dead connection: at once when the process dies
(its socket closes), after TCP keepalive timeouts when its machine or network does. Set
``idle_in_transaction_session_timeout`` (and TCP keepalives) on the server to bound the latter.
"""

from tidings.errors import MissingExtra

try:
    import psycopg  # noqa: F401
    import psycopg_pool  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise MissingExtra("the PostgreSQL store", "postgres", exc) from exc

from tidings.store.postgres.config import PostgresConfig, redact
from tidings.store.postgres.errors import translate
from tidings.store.postgres.schema import LATEST_VERSION, channel_name
from tidings.store.postgres.store import PostgresStore, migrate
from tidings.store.postgres.tx import PostgresTransaction, PostgresTx, to_psycopg
from tidings.store.postgres.writer import PostgresStatistics

__all__ = [
    "LATEST_VERSION",
    "PostgresConfig",
    "PostgresStatistics",
    "PostgresStore",
    "PostgresTransaction",
    "PostgresTx",
    "channel_name",
    "migrate",
    "redact",
    "to_psycopg",
    "translate",
]
