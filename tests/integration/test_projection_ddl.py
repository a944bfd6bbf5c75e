"""Projection tables whose DDL has semicolons inside literals start and work (every SQL backend)."""

from __future__ import annotations

import pytest

from tidings import (
    Event,
    EventStore,
    Projection,
    ProjectionTx,
    RetryPolicy,
    Service,
    SubscriptionConfig,
)

FAST = SubscriptionConfig(
    batch_size=100, poll_interval=0.05, retry=RetryPolicy(max_attempts=2, initial_delay=0.001, max_delay=0.01)
)


class Noted(Event):
    __event_type__ = "tests.projection_ddl.Noted"
    text: str


class Notes(Projection):
    name = "notes"
    tables = {
        "notes": (
            "CREATE TABLE {notes} (id TEXT PRIMARY KEY, note TEXT NOT NULL, "
            "kind TEXT NOT NULL DEFAULT 'a;b', CHECK (note <> ';'));\n"
            "-- an index; its name has no semicolon\n"
            "CREATE INDEX {notes}_kind ON {notes} (kind);"
        )
    }

    def noted(self, event: Noted, tx: ProjectionTx) -> None:
        tx.execute("INSERT INTO {notes} (id, note) VALUES (?, ?)", (tx.recorded.stream_id, event.text))


@pytest.mark.needs("sql")
async def test_semicolons_inside_literals_in_projection_ddl(store: EventStore) -> None:
    service = Service("ddl", store, config=FAST)
    service.add_projection(Notes())
    await store.append("n-1", [Noted(text="hello; world")])
    last = await store.append("n-2", [Noted(text=";;")])
    async with service.running():
        assert await service.wait_for(last.position, group="notes", timeout=10)
    rows = await store.query("SELECT id, note, kind FROM notes ORDER BY id")
    assert [tuple(r) for r in rows] == [("n-1", "hello; world", "a;b"), ("n-2", ";;", "a;b")]
    assert await store.dead_letters() == []
