"""Console requests that used to fail or cost too much: a trace's size is capped, odd digits and
out-of-range ``Last-Event-ID``s are refused cleanly, ids with ``/`` route, retries report what
really happened."""

from __future__ import annotations

import pytest

from tests.web.conftest import Client

pytestmark = pytest.mark.timeout(180)


async def test_a_trace_is_capped_at_ten_thousand_events(client: Client) -> None:
    async with client() as (http, _):
        for path in ("/api/trace/order-1", "/trace/order-1"):
            response = await http.get(path, params={"limit": 100_000})
            assert response.status_code == 422, response.text
            assert (await http.get(path, params={"limit": 10_000})).status_code == 200
