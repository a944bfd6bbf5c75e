"""The published OpenAPI description is what the API does: schemathesis generates requests for
every GET endpoint from ``/openapi.json`` of the running console (on a seeded SQLite store) and
checks each response -- status code documented, body valid against its schema, no server error.
Small on purpose (20 examples per endpoint): it runs in seconds.

(The operations are driven one by one with Hypothesis rather than by ``schemathesis.pytest``,
whose fixture-based loader does not work with this pytest version.)
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.web.live import LiveServer


@pytest.mark.timeout(300)
def test_every_get_endpoint_conforms_to_the_schema(live: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    checked = []
    for result in schema.include(method="GET").get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=20,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def conforms(case: schemathesis.Case) -> None:
            case.call_and_validate()

        conforms()
        checked.append(operation.path)
    # Every GET endpoint of the API was exercised (the SSE tail is not in the schema).
    assert set(checked) >= {
        "/api/info",
        "/api/streams",
        "/api/streams/{stream_id}",
        "/api/events",
        "/api/events/{ref}",
        "/api/groups",
        "/api/projections",
        "/api/dead-letters",
        "/api/dead-letters/{id}",
        "/api/sagas",
        "/api/sagas/{saga_id}",
        "/api/trace/{ref}",
    }
