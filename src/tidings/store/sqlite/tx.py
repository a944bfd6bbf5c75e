"""The SQLite store's SQL transactions: the :class:`~tidings.store.tracking.Tx` handed to projection
and handler code, and the commit of one subscription step (:class:`ProcessedBatch`)."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from tidings.errors import AlreadyProcessed, CheckpointConflict
from tidings.events import datetime_from_micros, uuid_from_bytes
from tidings.store.append import AppendResult
from tidings.store.base import now_micros
from tidings.store.deadletters import DeadLetterNotFound
from tidings.store.sqlite.errors import BINDING_ERRORS, translate
from tidings.store.sqlite.writer import append_in
from tidings.store.tracking import DeadLetter, ProcessedBatch

__all__ = ["SQLiteTx", "commit_processed_in", "dead_letter_from_row"]


class SQLiteTx:
    """:class:`~tidings.store.tracking.Tx` over the writer's connection (``?`` placeholders).

    Driver errors are raised as tidings' own (:mod:`tidings.store.sqlite.errors`), so that code
    running SQL here learns whether a retry can help.
    """

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self.conn = conn
        self.path = path

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except (sqlite3.Error, *BINDING_ERRORS) as exc:
            raise translate(exc, self.path) from exc

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> sqlite3.Cursor:
        try:
            return self.conn.executemany(sql, rows)
        except (sqlite3.Error, *BINDING_ERRORS) as exc:
            raise translate(exc, self.path) from exc

    def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self.conn.execute(sql, params).fetchone()
        except (sqlite3.Error, *BINDING_ERRORS) as exc:
            raise translate(exc, self.path) from exc
        return row

    def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.conn.execute(sql, params).fetchall()
        except (sqlite3.Error, *BINDING_ERRORS) as exc:
            raise translate(exc, self.path) from exc


def commit_processed_in(conn: sqlite3.Connection, batch: ProcessedBatch, path: str) -> list[AppendResult]:
    """Commit one subscription step in the writer's open transaction (see :class:`ProcessedBatch`).

    Raises :class:`CheckpointConflict` if the group's checkpoint is not the expected one."""
    row = conn.execute(
        "SELECT position FROM tidings_checkpoints WHERE group_name = ?", (batch.group,)
    ).fetchone()
    actual = 0 if row is None else int(row[0])
    if actual != batch.expected_checkpoint:
        raise CheckpointConflict(batch.group, batch.expected_checkpoint, actual)
    # First, so that a second retry of the same dead letter fails before its work runs: the whole
    # step rolls back, and the retried event's effects are committed once.
    if batch.remove_dead_letter is not None:
        cur = conn.execute("DELETE FROM tidings_dead_letters WHERE id = ?", (batch.remove_dead_letter,))
        if cur.rowcount == 0:
            raise DeadLetterNotFound(batch.group, batch.remove_dead_letter)
    if batch.processed:
        # An inbox row that exists already means another delivery of the event committed first
        # (a bus message handled twice): this one must change nothing.
        ids = [event_id.bytes for event_id, _ in batch.processed]
        marks = ", ".join("?" * len(ids))
        done = conn.execute(
            f"SELECT event_id FROM tidings_inbox WHERE group_name = ? AND event_id IN ({marks})",
            (batch.group, *ids),
        ).fetchall()
        if done:
            raise AlreadyProcessed(batch.group, [uuid_from_bytes(r[0]) for r in done])
    if batch.work is not None:
        batch.work(SQLiteTx(conn, path))
    results = [append_in(conn, request) for request in batch.appends]
    if batch.processed:
        conn.executemany(
            "INSERT INTO tidings_inbox (group_name, event_id, position) VALUES (?, ?, ?)",
            [(batch.group, event_id.bytes, position) for event_id, position in batch.processed],
        )
    now = now_micros()
    if batch.dead_letters:
        conn.executemany(
            # One entry per (group, event): a failed retry updates it and keeps its id.
            "INSERT INTO tidings_dead_letters (group_name, position, event_id, stream_id, "
            "event_type, error, traceback, attempts, failed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (group_name, event_id) DO UPDATE SET position = excluded.position, "
            "error = excluded.error, traceback = excluded.traceback, "
            "attempts = tidings_dead_letters.attempts + excluded.attempts, failed_at = excluded.failed_at",
            [
                (
                    batch.group,
                    d.position,
                    d.event_id.bytes,
                    d.stream_id,
                    d.event_type,
                    d.error,
                    d.traceback,
                    d.attempts,
                    now,
                )
                for d in batch.dead_letters
            ],
        )
    if batch.checkpoint != actual:
        conn.execute(
            "INSERT INTO tidings_checkpoints (group_name, position, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (group_name) DO UPDATE SET position = excluded.position, "
            "updated_at = excluded.updated_at",
            (batch.group, batch.checkpoint, now),
        )
    return results


def dead_letter_from_row(row: tuple[Any, ...]) -> DeadLetter:
    return DeadLetter(
        id=row[0],
        group=row[1],
        position=row[2],
        event_id=uuid.UUID(bytes=bytes(row[3])),
        stream_id=row[4],
        event_type=row[5],
        error=row[6],
        traceback=row[7],
        attempts=row[8],
        failed_at=datetime_from_micros(row[9]),
    )
