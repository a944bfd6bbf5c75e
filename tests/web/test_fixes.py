"""Console requests that used to fail or cost too much: a trace's size is capped, odd digits and
out-of-range ``Last-Event-ID``s are refused cleanly, ids with ``/`` route, retries report what
really happened."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import pytest

from tests.web.conftest import TOKEN, Client
from tests.web.world import OrderPlaced, Seeded, Switch, billing_service
from tidings import EventStore, Projection, ProjectionTx, Service
from tidings.store.tracking import DeadLetterRecord, ProcessedBatch, SQLStore, TrackingStore

pytestmark = pytest.mark.timeout(180)


async def test_a_trace_is_capped_at_ten_thousand_events(client: Client) -> None:
    async with client() as (http, _):
        for path in ("/api/trace/order-1", "/trace/order-1"):
            response = await http.get(path, params={"limit": 100_000})
            assert response.status_code == 422, response.text
            assert (await http.get(path, params={"limit": 10_000})).status_code == 200


async def test_dead_letters_are_paged(client: Client, seeded_url: tuple[str, Seeded]) -> None:
    async with client() as (http, store):
        assert isinstance(store, TrackingStore)
        # One more letter, so that there are two pages of one.
        await store.commit_processed(
            ProcessedBatch(
                "extra",
                expected_checkpoint=0,
                checkpoint=1,
                dead_letters=(DeadLetterRecord(1, uuid.uuid4(), "s", "t", "boom", "tb", 1),),
            )
        )
        every = [d.id for d in await store.dead_letters()]
        assert len(every) == 2 and every[0] == seeded_url[1].dead_letter
        first = (await http.get("/api/dead-letters", params={"limit": 1})).json()
        second = (await http.get("/api/dead-letters", params={"limit": 1, "after": first[0]["id"]})).json()
        assert [d["id"] for d in first + second] == every
        page = (await http.get("/dead-letters", params={"limit": 1})).text
        assert f"/dead-letters?after={every[0]}" in page and f'data-dead-letter="{every[1]}"' not in page


async def test_ids_with_a_slash_route(client: Client) -> None:
    stream_id = "tenant-7/order-1"
    async with client() as (http, store):
        await store.append(stream_id, [OrderPlaced(order_id="7", amount=70)])
        encoded = quote(stream_id, safe="")
        for path in (
            f"/api/streams/{encoded}",
            f"/streams/{encoded}",
            f"/api/trace/{encoded}",
            f"/trace/{encoded}",
        ):
            response = await http.get(path)
            assert response.status_code == 200, (path, response.text)
        assert (await http.get(f"/api/streams/{encoded}")).json()["stream"]["stream_id"] == stream_id
        assert f'href="/streams/{encoded}"' in (await http.get("/streams", params={"prefix": "tenant-"})).text
        assert (await http.get("/api/sagas/no%2Fsuch")).status_code == 404


async def test_a_retry_that_cannot_run_says_why(client: Client, seeded_url: tuple[str, Seeded]) -> None:
    switch = Switch()
    async with client(service=lambda store: billing_service(store, switch)) as (http, store):
        assert isinstance(store, TrackingStore)
        real = await store.dead_letter(seeded_url[1].dead_letter)
        assert real is not None
        # A letter whose event is not in the log (its id does not match the event at its position).
        checkpoint = await store.load_checkpoint(real.group)
        await store.commit_processed(
            ProcessedBatch(
                real.group,
                expected_checkpoint=checkpoint,
                checkpoint=checkpoint,
                dead_letters=(DeadLetterRecord(1, uuid.uuid4(), "s", "t", "old error", "tb", 1),),
            )
        )
        [ghost] = [d for d in await store.dead_letters() if d.error == "old error"]
        response = await http.post(
            f"/api/dead-letters/{ghost.id}/retry", headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert response.status_code == 409, response.text
        assert "no longer in the log" in response.json()["detail"] and "old error" not in response.text
        assert await store.dead_letter(ghost.id) == ghost  # nothing changed


async def test_odd_digits_and_huge_positions_are_refused_cleanly(client: Client) -> None:
    async with client() as (http, _):
        assert (await http.get("/api/events/²")).status_code == 404
        assert (await http.get("/events/²")).status_code == 404
        huge = str(2**63)
        response = await http.get("/api/tail", headers={"Last-Event-ID": huge})
        assert response.status_code == 422 and "Last-Event-ID" in response.text


class OrderTotals(Projection):
    name = "order_totals"
    tables = {"totals": "CREATE TABLE {totals} (order_id TEXT PRIMARY KEY, amount INTEGER)"}

    def placed(self, event: OrderPlaced, tx: ProjectionTx) -> None:
        tx.execute("INSERT INTO {totals} VALUES (?, ?)", (event.order_id, event.amount))


def with_totals(store: EventStore) -> Service:
    service = billing_service(store, Switch())
    service.add_projection(OrderTotals())
    return service


async def test_a_rebuild_left_interrupted_is_a_409_pointing_at_force(client: Client) -> None:
    async with client(service=with_totals) as (http, store):
        headers = {"Authorization": f"Bearer {TOKEN}"}
        done = await http.post("/api/projections/order_totals/rebuild", headers=headers)
        assert done.status_code == 200, done.text
        assert isinstance(store, SQLStore)
        # What a rebuild killed midway leaves: a generation marked as being built.
        await store.transaction(
            lambda tx: tx.execute("UPDATE tidings_projections SET building = generation + 7")
        )
        response = await http.post("/api/projections/order_totals/rebuild", headers=headers)
        assert response.status_code == 409, response.text
        assert "--force" in response.json()["detail"]
