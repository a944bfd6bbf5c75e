"""The console on a store holding an event that no longer decodes (its data fails its model's
validation -- what a subscription parks as a dead letter): every page, API read and the live tail
show it raw, marked "does not decode", instead of failing."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import httpx
import pytest

from tests.web.world import Seeded
from tidings import open_store
from tidings.store.tracking import TrackingStore
from tidings.web import create_app
from tidings.web.app import Console
from tidings.web.sse import tail

pytestmark = pytest.mark.timeout(180)


def corrupt(url: str, position: int) -> None:
    """Overwrite the stored data of the event at ``position`` with JSON its model refuses."""
    path = Path(url.removeprefix("sqlite:///"))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE tidings_events SET data = ? WHERE position = ?", (b'{"bogus": true}', position))


async def test_an_event_that_no_longer_decodes_is_shown_raw(sqlite_seeded: tuple[str, Seeded]) -> None:
    url, seeded = sqlite_seeded
    async with open_store(url) as store:
        assert isinstance(store, TrackingStore)
        dead = await store.dead_letter(seeded.dead_letter)
        assert dead is not None
    corrupt(url, dead.position)
    async with open_store(url) as store:
        app = create_app(store, token=None)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as http:
            stream = await http.get(f"/api/streams/{dead.stream_id}")
            assert stream.status_code == 200, stream.text
            [event] = [e for e in stream.json()["events"] if e["position"] == dead.position]
            assert event["data"] == {"bogus": True}
            assert event["undecodable"].startswith("does not decode:")

            page = (await http.get("/api/events", params={"after": dead.position - 1, "limit": 1})).json()
            assert page["events"][0]["undecodable"].startswith("does not decode:")

            detail = await http.get(f"/api/events/{dead.event_id}")
            assert detail.status_code == 200, detail.text
            assert detail.json()["event"]["data"] == {"bogus": True}
            assert (await http.get(f"/api/events/{dead.position}")).status_code == 200

            letter = await http.get(f"/api/dead-letters/{dead.id}")
            assert letter.status_code == 200, letter.text
            assert letter.json()["event"]["undecodable"].startswith("does not decode:")

            for path in (
                f"/streams/{dead.stream_id}",
                "/events",
                f"/events/{dead.event_id}",
                f"/dead-letters/{dead.id}",
                "/tail",
            ):
                response = await http.get(path)
                assert response.status_code == 200, (path, response.text)
            assert "does not decode" in (await http.get(f"/events/{dead.event_id}")).text

        console = Console(store, {"default": store})
        messages = tail(console, dead.position - 1, keepalive=0.2)
        assert (await anext(messages)).startswith("retry:")
        message = await asyncio.wait_for(anext(messages), timeout=30)
        await messages.aclose()
        assert f"id: {dead.position}\n" in message and "does not decode" in message
