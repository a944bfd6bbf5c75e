"""The console's JSON API on a real store (SQLite and PostgreSQL), seeded by running the test
system: reads, causation links, the token rules of the actions, and bad input changing nothing."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from tests.web.conftest import TOKEN, Client
from tests.web.world import FAST, OrderPlaced, Seeded, Switch, billing_service
from tidings import Bus, EventStore, HandlerContext, IntegrationEvent, Service, open_bus, open_store
from tidings.store.tracking import TrackingStore
from tidings.web import create_app
from tidings.web.app import Console
from tidings.web.sse import tail

pytestmark = pytest.mark.timeout(180)


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def snapshot(store: EventStore) -> tuple[int, list[int]]:
    """What an action could change: the head and the dead letters."""
    assert isinstance(store, TrackingStore)
    return await store.head(), [d.id for d in await store.dead_letters()]


async def test_streams_events_and_search(client: Client, seeded_url: tuple[str, Seeded]) -> None:
    seeded = seeded_url[1]
    async with client() as (http, _):
        info = (await http.get("/api/info")).json()
        assert info["head"] == seeded.head and info["actions_enabled"] and info["sql"]

        streams = (await http.get("/api/streams", params={"prefix": "order-"})).json()
        assert [s["stream_id"] for s in streams["streams"]] == ["order-1", "order-2"]
        first = (await http.get("/api/streams", params={"limit": 1})).json()
        rest = (await http.get("/api/streams", params={"after": first["next_after"]})).json()
        assert first["next_after"] == first["streams"][0]["stream_id"]
        assert first["next_after"] not in [s["stream_id"] for s in rest["streams"]]

        stream = (await http.get("/api/streams/order-2")).json()
        assert stream["stream"]["version"] == 1
        assert stream["events"][0]["data"] == {"order_id": "2", "amount": 20}

        found = (await http.get("/api/events", params={"type": "webtest.ReceiptSent"})).json()
        assert [e["stream_id"] for e in found["events"]] == ["receipt-1"]  # order 2's was parked
        by_prefix = (await http.get("/api/events", params={"prefix": "payment-"})).json()
        assert {e["event_type"] for e in by_prefix["events"]} == {"webtest.CardCharged"}
        latest = (await http.get("/api/events", params={"limit": 2})).json()
        assert [e["position"] for e in latest["events"]] == [seeded.head - 1, seeded.head]


async def test_event_detail_links_its_cause_and_what_it_caused(client: Client) -> None:
    async with client() as (http, _):
        [charged] = (await http.get("/api/events", params={"prefix": "payment-1"})).json()["events"]
        detail = (await http.get(f"/api/events/{charged['event_id']}")).json()
        assert detail["event"]["data"] == {"order_id": "1"}
        assert detail["cause"]["event_type"] == "webtest.ChargeCard"
        assert detail["cause"]["event_id"] == detail["causation_id"]
        assert detail["caused_complete"]
        assert "webtest.ReceiptSent" in [c["event_type"] for c in detail["caused"]]

        # The same event by position; its cause links back to it.
        by_position = (await http.get(f"/api/events/{charged['position']}")).json()
        assert by_position["event"]["event_id"] == charged["event_id"]
        cause = (await http.get(f"/api/events/{detail['cause']['event_id']}")).json()
        assert charged["event_id"] in [c["event_id"] for c in cause["caused"]]


async def test_groups_dead_letters_and_sagas(client: Client, seeded_url: tuple[str, Seeded]) -> None:
    seeded = seeded_url[1]
    async with client() as (http, _):
        groups = {g["group"]: g for g in (await http.get("/api/groups")).json()}
        assert groups["billing.receipt"]["dead_letters"] == 1
        assert groups["billing.receipt"]["lag"] == 0 and groups["billing.receipt"]["state"] == "stopped"
        assert "payments.charge" in groups and "saga:checkout" in groups

        [dead] = (await http.get("/api/dead-letters")).json()
        assert dead["id"] == seeded.dead_letter and dead["stream_id"] == "payment-2"
        assert (await http.get("/api/dead-letters", params={"group": "nope"})).json() == []
        detail = (await http.get(f"/api/dead-letters/{dead['id']}")).json()
        assert "mail server refused" in detail["traceback"] and detail["event"]["data"] == {"order_id": "2"}

        sagas = (await http.get("/api/sagas", params={"status": "completed"})).json()
        assert sorted(s["saga_id"] for s in sagas) == ["saga-checkout-1", "saga-checkout-2"]
        saga = (await http.get(f"/api/sagas/{seeded.saga_id}")).json()
        assert saga["state"]["status"] == "completed" and saga["state"]["done"] == ["charge"]
        assert saga["history"][0]["event_type"] == "tidings.saga.SagaStarted"


async def test_trace_of_an_order(client: Client, seeded_url: tuple[str, Seeded]) -> None:
    seeded = seeded_url[1]
    async with client() as (http, _):
        trace = (await http.get(f"/api/trace/{seeded.order_ids['2']}")).json()
        types = [n["event_type"] for n in trace["nodes"]]
        assert types[0] == "webtest.OrderPlaced" and "webtest.CardCharged" in types
        [parked] = [n for n in trace["nodes"] if n["dead_lettered"]]
        assert parked["event_type"] == "webtest.CardCharged"
        assert parked["dead_lettered"][0]["group"] == "billing.receipt"
        missing = await http.get("/api/trace/no-such-thing")
        assert missing.status_code == 404 and "no-such-thing" in missing.json()["detail"]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/streams/no-such-stream", 404),
        (f"/api/events/{uuid.uuid4()}", 404),
        ("/api/events/999999", 404),
        ("/api/events/not-an-id", 404),
        ("/api/dead-letters/999", 404),
        ("/api/sagas/saga-nope", 404),
        ("/api/events?limit=0", 422),
        ("/api/events?limit=abc", 422),
        ("/api/events?after=-1", 422),
        ("/api/streams?limit=100000", 422),
        ("/api/sagas?status=sleeping", 422),
        ("/api/dead-letters/0", 422),
        ("/api/events?source=nowhere", 200),  # the source applies to one event only
        ("/api/events/1?source=nowhere", 404),
    ],
)
async def test_bad_input_gets_a_clear_error_and_changes_nothing(
    client: Client, path: str, status: int
) -> None:
    async with client() as (http, store):
        before = await snapshot(store)
        response = await http.get(path)
        assert response.status_code == status, response.text
        if status == 404:
            assert response.json()["detail"]  # one clear sentence
        if status == 422:
            assert response.json()["detail"][0]["msg"]
        assert await snapshot(store) == before


async def test_actions_are_refused_without_a_configured_token(client: Client) -> None:
    async with client(token=None) as (http, store):
        before = await snapshot(store)
        dead = before[1][0]
        for action in ("retry", "discard"):
            response = await http.post(f"/api/dead-letters/{dead}/{action}", headers=auth())
            assert response.status_code == 403 and "--token" in response.json()["detail"]
        assert (await http.post("/api/projections/x/rebuild", headers=auth())).status_code == 403
        assert await snapshot(store) == before


async def test_actions_need_the_right_token(client: Client) -> None:
    async with client() as (http, store):
        before = await snapshot(store)
        dead = before[1][0]
        for headers in ({}, auth("wrong"), {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
            response = await http.post(f"/api/dead-letters/{dead}/discard", headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert await snapshot(store) == before

        done = await http.post(f"/api/dead-letters/{dead}/discard", headers=auth())
        assert done.status_code == 200 and done.json()["outcome"] == "discarded"
        assert await snapshot(store) == (before[0], [])
        again = await http.post(f"/api/dead-letters/{dead}/discard", headers=auth())
        assert again.status_code == 404


async def test_retry_needs_the_service(client: Client) -> None:
    async with client() as (http, store):
        before = await snapshot(store)
        response = await http.post(f"/api/dead-letters/{before[1][0]}/retry", headers=auth())
        assert response.status_code == 409 and "--app" in response.json()["detail"]
        assert await snapshot(store) == before


async def test_retry_runs_the_handler_again(client: Client) -> None:
    switch = Switch(broken=True)
    async with client(service=lambda store: billing_service(store, switch)) as (http, store):
        before = await snapshot(store)
        dead = before[1][0]
        failed = (await http.post(f"/api/dead-letters/{dead}/retry", headers=auth())).json()
        assert failed["outcome"] == "failed" and "mail server refused" in failed["error"]
        assert await snapshot(store) == before  # still parked, nothing written

        switch.broken = False
        done = (await http.post(f"/api/dead-letters/{dead}/retry", headers=auth())).json()
        assert done["outcome"] == "processed"
        assert await snapshot(store) == (before[0] + 1, [])
        assert [e.event_type async for e in store.read_stream("receipt-2")] == ["webtest.ReceiptSent"]
        gone = await http.post(f"/api/dead-letters/{dead}/retry", headers=auth())
        assert gone.status_code == 404


async def test_rebuild_needs_a_known_projection(client: Client) -> None:
    switch = Switch()
    async with client(service=lambda store: billing_service(store, switch)) as (http, _):
        response = await http.post("/api/projections/nope/rebuild", headers=auth())
        assert response.status_code == 404 and "has no projection 'nope'" in response.json()["detail"]


async def test_the_live_tail_sends_new_events(client: Client) -> None:
    async with client() as (_, store):
        console = Console(store, {"default": store})
        head = await store.head()
        stream = tail(console, head, keepalive=0.2)
        assert (await anext(stream)).startswith("retry:")
        assert await anext(stream) == ": keep-alive\n\n"  # nothing new yet
        result = await store.append("order-3", [OrderPlaced(order_id="3", amount=30)])
        message = await asyncio.wait_for(anext(stream), timeout=30)
        while message.startswith(":"):
            message = await asyncio.wait_for(anext(stream), timeout=30)
        lines = message.strip().split("\n")
        assert lines[0] == "event: tidings-event" and lines[1] == f"id: {result.position}"
        assert '"stream_id":"order-3"' in lines[2]
        await stream.aclose()


async def test_the_trace_joins_the_stores_of_several_services(tmp_path: object) -> None:
    """Each service owns a store; the trace follows causation from one into the other."""
    async with (
        open_store(f"sqlite:///{tmp_path}/orders.db") as orders,
        open_store(f"sqlite:///{tmp_path}/billing.db") as billing,
    ):
        await orders.append("order-9", [OrderPlaced(order_id="9", amount=90)])
        [placed] = [e async for e in orders.read_stream("order-9")]
        root = str(placed.event_id)
        await billing.append(
            "invoice-9",
            [OrderPlaced(order_id="9", amount=90)],
            metadata={"correlation_id": root, "causation_id": root},
        )
        app = create_app(orders, sources={"orders": orders, "billing": billing})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as http:
            trace = (await http.get(f"/api/trace/{root}")).json()
            page = await http.get(f"/trace/{root}")
    assert trace["services"] == ["orders", "billing"] and trace["count"] == 2
    assert trace["nodes"][1]["parent"] == root
    assert page.status_code == 200
    assert page.text.count('class="lane"') == 2 and 'data-service="billing"' in page.text


async def test_concurrent_retries_of_one_dead_letter_apply_it_once(client: Client) -> None:
    """Several retries of the same letter at once: one runs the handler, the others find it gone
    (404, as after a retry that finished) rather than claiming it failed and stays parked."""
    switch = Switch(broken=False)
    async with client(service=lambda store: billing_service(store, switch)) as (http, store):
        before = await snapshot(store)
        dead = before[1][0]
        answers = await asyncio.gather(
            *(http.post(f"/api/dead-letters/{dead}/retry", headers=auth()) for _ in range(4))
        )
        codes = sorted(a.status_code for a in answers)
        assert codes == [200, 404, 404, 404], [a.text for a in answers]
        assert [a.json()["outcome"] for a in answers if a.status_code == 200] == ["processed"]
        # Gone while it ran, or before it started.
        missing = [a.json()["detail"] for a in answers if a.status_code == 404]
        assert all("is gone" in d or f"no dead letter with id {dead}" in d for d in missing), missing
        assert await snapshot(store) == (before[0] + 1, [])
        assert [e.event_type async for e in store.read_stream("receipt-2")] == ["webtest.ReceiptSent"]


class ParcelShipped(IntegrationEvent):
    __source__ = "webtest-warehouse"
    __event_type__ = "webtest.ParcelShipped"
    parcel: str


def courier_service(store: EventStore | str, bus: Bus | None = None) -> Service:
    """A service that handles the warehouse's integration event and always fails on it."""
    courier = Service("courier", store, bus=bus, config=FAST)

    @courier.handles(ParcelShipped)
    async def book_pickup(event: ParcelShipped, ctx: HandlerContext) -> None:
        raise ValueError("the courier is closed")

    return courier


async def test_retrying_a_dead_letter_from_the_bus_says_why_it_cannot(tmp_path: object) -> None:
    """A letter parked by a bus consumer (group ``<group>@bus``) holds a message that is not in
    the service's log: the console refuses to retry it with that reason (409), not with a claim
    that the service does not run the group, and changes nothing."""
    async with open_bus("memory://") as bus:
        warehouse = Service("webtest-warehouse", f"sqlite:///{tmp_path}/warehouse.db", bus=bus)
        warehouse.publishes(ParcelShipped)
        courier = courier_service(f"sqlite:///{tmp_path}/courier.db", bus)
        async with warehouse, courier, warehouse.running(), courier.running():
            await warehouse.publish("parcel-1", [ParcelShipped(parcel="1")])
            store = courier.store
            assert isinstance(store, TrackingStore)
            for _ in range(600):
                if await store.dead_letters():
                    break
                await asyncio.sleep(0.05)
    async with open_store(f"sqlite:///{tmp_path}/courier.db") as store:
        assert isinstance(store, TrackingStore)
        [dead] = await store.dead_letters()
        assert dead.group == "courier.book_pickup@bus"
        app = create_app(store, token=TOKEN, service=courier_service(store))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as http:
            response = await http.post(f"/api/dead-letters/{dead.id}/retry", headers=auth())
        assert response.status_code == 409, response.text
        assert "came from the bus" in response.json()["detail"]
        assert [d.id for d in await store.dead_letters()] == [dead.id]


async def test_the_live_tail_ends_when_the_store_closes_or_the_console_stops(tmp_path: object) -> None:
    """A tail ends its response (the browser resumes with Last-Event-ID) when the store is
    closed under it or the console is stopping, instead of failing mid-response."""
    async with open_store(f"sqlite:///{tmp_path}/tail.db") as store:
        console = Console(store, {"default": store})
        stream = tail(console, 0, keepalive=0.2)
        assert (await anext(stream)).startswith("retry:")
        await store.append("order-1", [OrderPlaced(order_id="1", amount=1)])
        assert (await asyncio.wait_for(anext(stream), timeout=30)).startswith("event: tidings-event")
        stopping = tail(console, 1, keepalive=30)
        assert (await anext(stopping)).startswith("retry:")
        pending = asyncio.ensure_future(anext(stopping))
        console.stopping.set()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, timeout=30)
    with pytest.raises(StopAsyncIteration):
        while True:
            assert (await asyncio.wait_for(anext(stream), timeout=30)).startswith(":")


async def test_streams_whose_ids_hold_slashes_open_in_the_api_and_the_pages(tmp_path: object) -> None:
    """Stream ids may hold any text but NUL: 'tenant/7' and '../etc' are streams like others.
    Their pages, API reads and traces answer, and the pages link to them with '/' encoded (a
    browser would otherwise resolve '/streams/../etc' to '/etc')."""
    async with open_store(f"sqlite:///{tmp_path}/slashes.db") as store:
        for stream in ("tenant/7", "../etc"):
            await store.append(stream, [OrderPlaced(order_id=stream, amount=1)])
        app = create_app(store)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://c") as http:
            for stream, path in (("tenant/7", "tenant%2F7"), ("../etc", "..%2Fetc")):
                read = await http.get(f"/api/streams/{path}")
                assert read.status_code == 200, read.text
                assert read.json()["stream"]["stream_id"] == stream
                trace = await http.get(f"/api/trace/{path}")
                assert trace.status_code == 200 and trace.json()["nodes"][0]["stream_id"] == stream
                assert (await http.get(f"/streams/{path}")).status_code == 200
                assert (await http.get(f"/trace/{path}")).status_code == 200
            listing = (await http.get("/streams")).text
            assert 'href="/streams/tenant%2F7"' in listing and 'href="/streams/..%2Fetc"' in listing
            stream_page = (await http.get("/streams/tenant%2F7")).text
            assert 'href="/trace/tenant%2F7"' in stream_page


@pytest.mark.parametrize("header", ["99999999999999999999999", "\u0663", "-5", "abc"])
async def test_a_bad_last_event_id_is_refused_before_the_tail_starts(client: Client, header: str) -> None:
    """Last-Event-ID must be a position (ASCII digits, at most 2**63 - 1): anything else is a 422,
    not a stream that breaks off with a traceback after its first line."""
    async with client() as (http, _):
        response = await http.get("/api/tail", headers={"Last-Event-ID": header.encode()})
        assert response.status_code == 422, response.text
        assert "Last-Event-ID" in response.text
