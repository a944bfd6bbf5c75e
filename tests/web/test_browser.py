"""The console in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright,
against uvicorn serving the console on a seeded SQLite store.

Chromium is ``$TIDINGS_TEST_CHROMIUM`` or ``/usr/bin/chromium``; when it is missing the tests fail
and say how to install it (``make test`` installs it when it can, see tools/ensure-chromium).
Screenshots go to ``tests/artifacts/`` (not committed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.web.conftest import TOKEN
from tests.web.live import LiveServer, run_async
from tests.web.world import OrderPlaced
from tidings import open_store
from tidings.store.tracking import TrackingStore
from tidings.web import create_app

pytestmark = pytest.mark.timeout(240)

ARTIFACTS = Path(__file__).parent.parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    path = os.environ.get("TIDINGS_TEST_CHROMIUM", "/usr/bin/chromium")
    if not os.access(path, os.X_OK):
        pytest.fail(
            f"no Chromium at {path} for the browser tests: install Debian's chromium: "
            "apt-get install chromium (or set TIDINGS_TEST_CHROMIUM to a Chromium binary)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        yield context.new_page()
    finally:
        context.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def _dead_letters(url: str) -> list[int]:
    async with open_store(url) as store:
        assert isinstance(store, TrackingStore)
        return [d.id for d in await store.dead_letters()]


async def _stream_types(url: str, stream_id: str) -> list[str]:
    async with open_store(url) as store:
        return [e.event_type async for e in store.read_stream(stream_id)]


def test_the_pages_load_and_link_to_each_other(live: LiveServer, page: Page) -> None:
    page.goto(f"{live.url}/streams")
    expect(page.locator("#streams")).to_contain_text("order-1")
    shot(page, "streams")
    page.get_by_role("link", name="payment-1").click()
    expect(page.locator("h1")).to_contain_text("payment-1")

    page.get_by_role("link", name="webtest.CardCharged").click()
    expect(page.locator("#data")).to_contain_text('"order_id": "1"')
    expect(page.locator("#cause")).to_contain_text("webtest.ChargeCard")
    expect(page.locator("#caused")).to_contain_text("webtest.ReceiptSent")
    shot(page, "event")
    page.locator("#cause a").click()  # the causation link leads to the cause ...
    expect(page.locator("h1")).to_have_text("webtest.ChargeCard")
    expect(page.locator("#caused")).to_contain_text("webtest.CardCharged")  # ... which links back

    page.goto(f"{live.url}/events")
    page.locator("input[name=type]").fill("webtest.OrderPlaced webtest.ReceiptSent")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#events tbody tr")).to_have_count(3)  # two orders, one receipt

    page.goto(f"{live.url}/groups")
    expect(page.locator("#groups")).to_contain_text("billing.receipt")
    expect(page.locator("#groups")).to_contain_text("saga:checkout")
    shot(page, "groups")

    page.goto(f"{live.url}/dead-letters")
    expect(page.locator("#dead-letters tbody tr")).to_have_count(1)
    expect(page.locator("#dead-letters")).to_contain_text("mail server refused")
    shot(page, "dead-letters")

    page.goto(f"{live.url}/sagas")
    expect(page.locator("#sagas tbody tr")).to_have_count(2)
    page.get_by_role("link", name="saga-checkout-1").click()
    expect(page.locator("#saga-status")).to_have_text("completed")
    expect(page.locator("#history")).to_contain_text("tidings.saga.SagaCompleted")
    shot(page, "saga")

    # One store, several services: each handler stamps its service on what it emits.
    page.goto(f"{live.url}/trace/{live.seeded.order_ids['2']}")
    diagram = page.locator("#diagram svg")
    lanes = diagram.locator("g.lane")
    expect(lanes).to_have_count(3)
    assert [lanes.nth(i).get_attribute("data-service") for i in range(3)] == ["default", "orders", "payments"]
    expect(diagram.locator("g.event").first).to_contain_text("OrderPlaced")
    expect(diagram.locator("g.event.dead")).to_have_count(1)  # billing parked its CardCharged
    expect(diagram.locator("g.event.dead")).to_contain_text("CardCharged")
    shot(page, "trace-one-store")

    page.goto(f"{live.url}/streams/no-such-stream")
    expect(page.locator("#error-message")).to_contain_text("no stream 'no-such-stream'")


def test_the_live_tail_shows_a_new_event_without_reload(live: LiveServer, page: Page) -> None:
    page.goto(f"{live.url}/tail")
    expect(page.locator("#tail-status")).to_have_text("live", timeout=30_000)
    expect(page.locator("#tail")).not_to_contain_text("order-7")

    async def append() -> None:  # another process's append, seen by the store's change detection
        async with open_store(live.store_url) as store:
            await store.append("order-7", [OrderPlaced(order_id="7", amount=70)])

    run_async(append())
    expect(page.locator("#tail tbody tr").first).to_contain_text("order-7", timeout=30_000)
    expect(page.locator("#tail tbody tr").first).to_contain_text("webtest.OrderPlaced")
    shot(page, "tail")


def test_a_dead_letter_is_retried_from_the_page_with_the_token_only(live: LiveServer, page: Page) -> None:
    before = run_async(_dead_letters(live.store_url))
    assert len(before) == 1
    live.switch.broken = False  # the mail server is back

    page.goto(f"{live.url}/dead-letters")
    row = page.locator(f'tr[data-dead-letter="{before[0]}"]')
    row.get_by_role("button", name="Retry").click()  # no token typed
    expect(page.locator("#flash")).to_contain_text("401")
    page.locator("#token").fill("not-the-token")
    row.get_by_role("button", name="Retry").click()
    expect(page.locator("#flash")).to_contain_text("401: wrong token")
    assert run_async(_dead_letters(live.store_url)) == before  # refused: nothing changed
    assert run_async(_stream_types(live.store_url, "receipt-2")) == []

    page.locator("#token").fill(TOKEN)
    row.get_by_role("button", name="Retry").click()
    expect(page.locator("#flash")).to_contain_text(f"dead letter {before[0]} processed and removed")
    expect(page.locator("#dead-letters tbody tr[data-dead-letter]")).to_have_count(0)
    shot(page, "dead-letter-retried")
    assert run_async(_dead_letters(live.store_url)) == []
    assert run_async(_stream_types(live.store_url, "receipt-2")) == ["webtest.ReceiptSent"]


def test_the_trace_is_a_sequence_diagram_with_a_lane_per_service(tmp_path: Path, page: Page) -> None:
    """Two services, each with its own store: the diagram has their two lanes, and an arrow
    from the order to what billing did with it."""

    async def seed() -> str:
        async with (
            open_store(f"sqlite:///{tmp_path}/orders.db") as orders,
            open_store(f"sqlite:///{tmp_path}/billing.db") as billing,
        ):
            await orders.append("order-9", [OrderPlaced(order_id="9", amount=90)])
            [placed] = [e async for e in orders.read_stream("order-9")]
            root = str(placed.event_id)
            for n in range(2):
                await billing.append(
                    f"invoice-9-{n}",
                    [OrderPlaced(order_id="9", amount=n)],
                    metadata={"correlation_id": root, "causation_id": root},
                )
            return root

    root = run_async(seed())
    orders, billing = (
        open_store(f"sqlite:///{tmp_path}/orders.db"),
        open_store(f"sqlite:///{tmp_path}/billing.db"),
    )
    app = create_app(orders, sources={"orders": orders, "billing": billing})
    with LiveServer(app) as server:
        page.goto(f"{server.url}/trace")
        page.locator("input[name=ref]").fill(root)
        page.get_by_role("button", name="Trace").click()
        diagram = page.locator("#diagram svg")
        expect(diagram).to_be_visible()
        lanes = diagram.locator("g.lane")
        expect(lanes).to_have_count(2)
        assert [lanes.nth(i).get_attribute("data-service") for i in range(2)] == ["orders", "billing"]
        expect(diagram.locator("g.event")).to_have_count(3)
        expect(diagram.locator("g.event path.msg")).to_have_count(2)  # two arrows from their cause
        shot(page, "trace")
        diagram.locator("g.event a").first.click()  # every event links to its page
        expect(page.locator("#event-id")).to_have_text(root)
