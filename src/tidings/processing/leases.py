"""Leases: one process at a time runs a subscription group against a store, with failover.

Two processes running the same group would both call its handlers: the checkpoint's
compare-and-set keeps the *store's* effects exactly-once, but a handler's outside effects (an
e-mail, a call to another system) would happen twice. So a runner first takes its group's
*lease*: a row in ``tidings_leases`` naming the holder (host, pid and a random instance id),
when it took the lease, its last heartbeat and when the lease expires.

* **Acquire**: the lease is taken if it is free, expired, or already ours -- one conditional
  upsert, so two candidates never both win. A candidate that is not failing itself may also take
  it from a holder that reports ``failed`` (e.g. a projection runner whose code is older or newer
  than the active generation): a runner that cannot work does not keep the group from one that
  can, and two failing runners do not take it from each other.
* **Heartbeat**: the holder renews it every ``ttl / 3`` seconds, moving ``expires_at`` to
  ``now + ttl``; it reports its state (live, catching up, failed) and last error with it.
* **Loss**: the holder counts its lease as lost when a renewal finds another holder, or when
  ``ttl`` has passed (on its own monotonic clock, measured from *before* its last successful
  renewal was sent) without a successful renewal. That moment is never later than the expiry
  the database recorded, so by the time a standby may take over, the old holder has stopped
  calling handlers (a handler already running finishes: that event is *in flight*).
* **Release**: a graceful stop expires the lease at once, keeping the row (last holder, last
  heartbeat) for status displays.

Times are seconds since the epoch from the database's clock where there is one (PostgreSQL's
``clock_timestamp()``), so that hosts with skewed clocks agree on expiry; SQLite is shared by
processes of one machine, whose clock they share. The ``memory://`` store is private to its
process, where the in-process group lock already keeps runners apart; its leases live in the
process and exist for status displays.

Failover: a holder killed right after a renewal leaves a lease valid for ``ttl`` seconds; a
standby checks every ``min(poll_interval, ttl / 4)`` seconds, so another process takes over at
most ``ttl + min(poll_interval, ttl / 4)`` seconds (plus one transaction) after the kill.
"""

from __future__ import annotations

import abc
import dataclasses
import os
import secrets
import socket
import time
import weakref
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from tidings.errors import TidingsError, is_transient
from tidings.store.base import EventStore
from tidings.store.tracking import SQLStore, Tx

__all__ = ["Lease", "LeaseHolder", "LeaseRecord", "read_leases"]

_COLUMNS: Final = "name, holder, host, pid, acquired_at, heartbeat_at, expires_at, state, last_error"

_TABLE: Final = """
CREATE TABLE IF NOT EXISTS tidings_leases (
    name         TEXT             PRIMARY KEY,
    holder       TEXT             NOT NULL,
    host         TEXT             NOT NULL,
    pid          BIGINT           NOT NULL,
    acquired_at  DOUBLE PRECISION NOT NULL,
    heartbeat_at DOUBLE PRECISION NOT NULL,
    expires_at   DOUBLE PRECISION NOT NULL,
    state        TEXT             NOT NULL,
    last_error   TEXT
)
"""


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseHolder:
    """Who holds a lease: the host, the process id, and an id unique to one runner."""

    host: str
    pid: int
    instance: str

    @classmethod
    def here(cls) -> LeaseHolder:
        """A new holder identity for a runner of this process."""
        return cls(socket.gethostname(), os.getpid(), secrets.token_hex(8))

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}"


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseRecord:
    """A group's lease as stored: its holder, times, and the holder's last reported state.

    ``alive`` is whether the lease had not expired when it was read (by the database's clock).
    """

    name: str
    holder: LeaseHolder
    acquired_at: datetime
    heartbeat_at: datetime
    expires_at: datetime
    state: str
    last_error: str | None
    alive: bool


def _instant(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def _record(row: Sequence[Any], now: float) -> LeaseRecord:
    name, holder, host, pid, acquired, heartbeat, expires, state, last_error = row
    return LeaseRecord(
        name,
        LeaseHolder(host, int(pid), holder),
        _instant(float(acquired)),
        _instant(float(heartbeat)),
        _instant(float(expires)),
        state,
        last_error,
        float(expires) > now,
    )


class _Table(abc.ABC):
    """Where a store's leases live."""

    @abc.abstractmethod
    async def available(self, name: str, holder: LeaseHolder, preempt: bool) -> bool:
        """Whether the lease looks free, expired, ours or (with ``preempt``) held by a failing
        runner: a cheap read before trying to take it."""

    @abc.abstractmethod
    async def acquire(
        self, name: str, holder: LeaseHolder, ttl: float, state: str, preempt: bool
    ) -> bool: ...

    @abc.abstractmethod
    async def renew(
        self, name: str, holder: LeaseHolder, ttl: float, state: str, last_error: str | None
    ) -> bool: ...

    @abc.abstractmethod
    async def release(self, name: str, holder: LeaseHolder) -> None: ...

    @abc.abstractmethod
    async def read(self) -> list[LeaseRecord]: ...


def _takeable(
    current: str, expires_at: float, state: str, holder: LeaseHolder, now: float, preempt: bool
) -> bool:
    """Whether ``holder`` may take a lease held by ``current``: it is ours, expired, or (with
    ``preempt``) its holder reports that it is failing."""
    return current == holder.instance or expires_at <= now or (preempt and state == "failed")


def _db_now(tx: Tx) -> float:
    """Seconds since the epoch by the database's clock (PostgreSQL) or this machine's (SQLite)."""
    if tx.dialect == "postgresql":
        row = tx.fetchone("SELECT extract(epoch FROM clock_timestamp())::float8")
        assert row is not None
        return float(row[0])
    return time.time()


def _ensure_table(tx: Tx) -> None:
    if tx.dialect == "postgresql":
        found = tx.fetchone("SELECT to_regclass('tidings_leases') IS NOT NULL")
        if found is not None and found[0]:
            return
        # Serialise concurrent creators: two CREATE TABLE IF NOT EXISTS racing in PostgreSQL can
        # both miss the other's table and collide in the catalog.
        tx.execute("SELECT pg_advisory_xact_lock(hashtext(current_schema() || '.tidings_leases'))")
    tx.execute(_TABLE)


class _SQLTable(_Table):
    """Leases in the store's own database, through its public transaction API."""

    def __init__(self, store: SQLStore) -> None:
        self.store = store
        self._ready = False
        # Reads go through store.query(), which does not say its dialect: the URL does.
        self._postgres = urlsplit(store.url).scheme.startswith("postgres")

    def _prepare(self, tx: Tx) -> float:
        if not self._ready:
            _ensure_table(tx)
        return _db_now(tx)

    async def _select(self, where: str, params: Sequence[Any]) -> tuple[list[tuple[Any, ...]], float]:
        """Lease rows and the database's time, read without a write transaction (status displays
        and standbys poll this; on SQLite every write transaction queues behind the holder's
        commits)."""
        now = ", extract(epoch FROM clock_timestamp())::float8" if self._postgres else ""
        rows = await self.store.query(f"SELECT {_COLUMNS}{now} FROM tidings_leases{where}", params)
        if self._postgres:
            return [row[:-1] for row in rows], float(rows[0][-1]) if rows else 0.0
        return rows, time.time()

    async def available(self, name: str, holder: LeaseHolder, preempt: bool) -> bool:
        if not self._ready:
            return True  # the table may not exist yet: let acquire() create it
        rows, now = await self._select(" WHERE name = ?", (name,))
        if not rows:
            return True
        row = rows[0]
        return _takeable(row[1], float(row[6]), row[7], holder, now, preempt)

    async def _run(self, fn: Any) -> Any:
        result = await self.store.transaction(fn)
        self._ready = True
        return result

    async def acquire(self, name: str, holder: LeaseHolder, ttl: float, state: str, preempt: bool) -> bool:
        def acquire(tx: Tx) -> bool:
            now = self._prepare(tx)
            # One statement, so that two candidates never both win: insert a free lease, or take
            # over an expired one (or ours). Taking it over from ourselves keeps acquired_at.
            tx.execute(
                f"INSERT INTO tidings_leases ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, host = excluded.host, "
                "pid = excluded.pid, acquired_at = CASE WHEN tidings_leases.holder = excluded.holder "
                "THEN tidings_leases.acquired_at ELSE excluded.acquired_at END, "
                "heartbeat_at = excluded.heartbeat_at, expires_at = excluded.expires_at, "
                "state = excluded.state, last_error = NULL "
                "WHERE tidings_leases.holder = excluded.holder "
                "OR tidings_leases.expires_at <= excluded.heartbeat_at "
                "OR (tidings_leases.state = 'failed' AND ? = 1)",
                (name, holder.instance, holder.host, holder.pid, now, now, now + ttl, state, int(preempt)),
            )
            row = tx.fetchone("SELECT holder FROM tidings_leases WHERE name = ?", (name,))
            return row is not None and row[0] == holder.instance

        return bool(await self._run(acquire))

    async def renew(
        self, name: str, holder: LeaseHolder, ttl: float, state: str, last_error: str | None
    ) -> bool:
        def renew(tx: Tx) -> bool:
            now = self._prepare(tx)
            tx.execute(
                "UPDATE tidings_leases SET heartbeat_at = ?, expires_at = ?, state = ?, last_error = ? "
                "WHERE name = ? AND holder = ?",
                (now, now + ttl, state, last_error, name, holder.instance),
            )
            row = tx.fetchone("SELECT holder FROM tidings_leases WHERE name = ?", (name,))
            return row is not None and row[0] == holder.instance

        return bool(await self._run(renew))

    async def release(self, name: str, holder: LeaseHolder) -> None:
        def release(tx: Tx) -> None:
            now = self._prepare(tx)
            tx.execute(
                "UPDATE tidings_leases SET expires_at = ?, state = 'stopped' WHERE name = ? AND holder = ?",
                (now, name, holder.instance),
            )

        await self._run(release)

    async def read(self) -> list[LeaseRecord]:
        try:
            rows, now = await self._select(" ORDER BY name", ())
        except TidingsError as exc:
            if is_transient(exc):
                raise
            # No lease table yet (no runner ever started here): create it, and read in the same
            # transaction, which also raises any other error the read above met.
            return await self._read_creating()
        return [_record(row, now) for row in rows]

    async def _read_creating(self) -> list[LeaseRecord]:
        def read(tx: Tx) -> list[LeaseRecord]:
            now = self._prepare(tx)
            rows = tx.fetchall(f"SELECT {_COLUMNS} FROM tidings_leases ORDER BY name")
            return [_record(row, now) for row in rows]

        found: list[LeaseRecord] = await self._run(read)
        return found


# The leases of memory:// stores, per store object (they go with it), by lease name: rows as the
# SQL table has them.
_MEMORY_LEASES: weakref.WeakKeyDictionary[EventStore, dict[str, tuple[Any, ...]]] = (
    weakref.WeakKeyDictionary()
)


class _MemoryTable(_Table):
    """Leases of a ``memory://`` store: process-local rows (the store is process-local too)."""

    def __init__(self, store: EventStore) -> None:
        self.rows = _MEMORY_LEASES.setdefault(store, {})

    async def available(self, name: str, holder: LeaseHolder, preempt: bool) -> bool:
        row = self.rows.get(name)
        return row is None or _takeable(row[1], row[6], row[7], holder, time.time(), preempt)

    async def acquire(self, name: str, holder: LeaseHolder, ttl: float, state: str, preempt: bool) -> bool:
        now = time.time()
        row = self.rows.get(name)
        if row is not None and not _takeable(row[1], row[6], row[7], holder, now, preempt):
            return False
        acquired = row[4] if row is not None and row[1] == holder.instance else now
        self.rows[name] = (
            name,
            holder.instance,
            holder.host,
            holder.pid,
            acquired,
            now,
            now + ttl,
            state,
            None,
        )
        return True

    async def renew(
        self, name: str, holder: LeaseHolder, ttl: float, state: str, last_error: str | None
    ) -> bool:
        row = self.rows.get(name)
        if row is None or row[1] != holder.instance:
            return False
        now = time.time()
        self.rows[name] = (*row[:5], now, now + ttl, state, last_error)
        return True

    async def release(self, name: str, holder: LeaseHolder) -> None:
        row = self.rows.get(name)
        if row is not None and row[1] == holder.instance:
            self.rows[name] = (*row[:6], time.time(), "stopped", row[8])

    async def read(self) -> list[LeaseRecord]:
        now = time.time()
        return [_record(row, now) for _, row in sorted(self.rows.items())]


def _table(store: EventStore) -> _Table:
    # A store with SQL keeps leases in a table; others (memory://) are private to their process.
    return _SQLTable(store) if isinstance(store, SQLStore) else _MemoryTable(store)


async def read_leases(store: EventStore) -> dict[str, LeaseRecord]:
    """Every lease recorded in ``store``'s database, by name (a group; a projection's name)."""
    return {record.name: record for record in await _table(store).read()}


class Lease:
    """One runner's claim on the lease ``name`` in ``store``'s database.

    :meth:`acquire` tries once; :meth:`renew` extends a held lease; :attr:`held` says whether
    the lease may still be relied on, by this process's monotonic clock; :meth:`release` gives
    it up. Store errors propagate (a failed renewal does not end the lease by itself: it lapses
    ``ttl`` seconds after the last renewal that succeeded).
    """

    def __init__(
        self, store: EventStore, name: str, ttl: float, *, holder: LeaseHolder | None = None
    ) -> None:
        self.store = store
        self.name = name
        self.ttl = float(ttl)
        self.holder = holder or LeaseHolder.here()
        self._table = _table(store)
        self._deadline = 0.0  # time.monotonic() after which the lease can no longer be relied on

    @property
    def held(self) -> bool:
        """True while the lease is ours and not yet lapsed by this process's clock."""
        return time.monotonic() < self._deadline

    @property
    def remaining(self) -> float:
        """Seconds until the lease lapses unless renewed (0 if it is not held)."""
        return max(0.0, self._deadline - time.monotonic())

    def lose(self) -> None:
        """Stop relying on the lease at once (another holder has it, or it was given up)."""
        self._deadline = 0.0

    async def acquire(self, state: str = "catching up", *, preempt_failed: bool = False) -> bool:
        """Take the lease if it is free, expired or ours -- or, with ``preempt_failed``, held by
        a runner that reports ``failed``; True if we hold it now."""
        if not await self._table.available(self.name, self.holder, preempt_failed):
            self.lose()
            return False
        sent = time.monotonic()
        if await self._table.acquire(self.name, self.holder, self.ttl, state, preempt_failed):
            self._deadline = sent + self.ttl
            return True
        self.lose()
        return False

    async def renew(self, state: str, last_error: str | None = None) -> bool:
        """Extend the lease by ``ttl`` and report the runner's state; False if it is no longer ours."""
        sent = time.monotonic()
        if await self._table.renew(self.name, self.holder, self.ttl, state, last_error):
            self._deadline = sent + self.ttl
            return True
        self.lose()
        return False

    async def release(self) -> None:
        """Give the lease up now, so that a standby takes over without waiting for it to expire."""
        self.lose()
        await self._table.release(self.name, self.holder)

    async def current(self) -> LeaseRecord | None:
        """The lease as stored now (whoever holds it), or None if it was never taken."""
        return (await read_leases(self.store)).get(self.name)
