"""An inbox for effects in a database other than the store's.

When a handler's effect lands in *its own* database (not the store's), exactly-once needs the
record "event X was processed" to commit in that database, in the same transaction as the
effect. :class:`SQLiteInbox` does that for a SQLite database the consumer owns::

    inbox = SQLiteInbox("sqlite:///mailer.db")

    @service.handles(OrderPlaced)
    async def remember(event: OrderPlaced, ctx: HandlerContext) -> None:
        await inbox.once(ctx.recorded.event_id, lambda db: db.execute(
            "INSERT INTO sent (order_id) VALUES (?)", (event.order_id,)), scope=ctx.group)

A redelivered event (after a crash between the effect and the subscription's checkpoint, or a
duplicate from a broker) finds its id in the inbox and the effect is skipped.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Callable
from typing import TypeVar

from tidings.errors import StoreError
from tidings.store.sqlite import SQLiteConfig, connect

__all__ = ["SQLiteInbox"]

T = TypeVar("T")


class SQLiteInbox:
    """Processed-message ids kept in a consumer's own SQLite database, beside its effects."""

    def __init__(self, url: str, *, table: str = "tidings_inbox_received") -> None:
        self.config = SQLiteConfig.from_url(url)
        if not table.replace("_", "").isalnum():
            raise StoreError(f"inbox table name must be an identifier, got {table!r}")
        self.table = table
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = connect(self.config)
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self.table} (scope TEXT NOT NULL, message_id TEXT NOT NULL, "
                "received_at TEXT DEFAULT CURRENT_TIMESTAMP, PRIMARY KEY (scope, message_id))"
            )
            self._conn = conn
        return self._conn

    def _once(
        self, scope: str, message_id: str, effect: Callable[[sqlite3.Connection], T]
    ) -> tuple[bool, T | None]:
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                inserted = conn.execute(
                    f"INSERT OR IGNORE INTO {self.table} (scope, message_id) VALUES (?, ?)",
                    (scope, message_id),
                ).rowcount
                if not inserted:
                    conn.execute("ROLLBACK")
                    return False, None
                result = effect(conn)
                conn.execute("COMMIT")
                return True, result
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    async def once(
        self,
        message_id: uuid.UUID | str,
        effect: Callable[[sqlite3.Connection], T],
        *,
        scope: str = "",
    ) -> tuple[bool, T | None]:
        """Run ``effect(conn)`` and record ``message_id`` in one transaction, unless already recorded.

        ``scope`` separates consumers sharing one inbox (pass the handler's group, ``ctx.group``):
        the same message is processed once per scope. Returns ``(True, result)`` when the effect
        ran, ``(False, None)`` for a duplicate. If the effect raises, neither it nor the record is
        kept.
        """
        return await asyncio.to_thread(self._once, scope, str(message_id), effect)

    async def seen(self, message_id: uuid.UUID | str, *, scope: str = "") -> bool:
        """Whether ``message_id`` was processed in ``scope``."""

        def check() -> bool:
            with self._lock:
                row = (
                    self._connection()
                    .execute(
                        f"SELECT 1 FROM {self.table} WHERE scope = ? AND message_id = ?",
                        (scope, str(message_id)),
                    )
                    .fetchone()
                )
                return row is not None

        return await asyncio.to_thread(check)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
