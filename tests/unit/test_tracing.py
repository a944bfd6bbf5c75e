"""W3C trace context: parsing and generating ``traceparent``, and the rules that stamp it on events."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from tidings import InvalidArgument, open_store, tracing
from tidings.events import EventRegistry
from tidings.testing.events import Credited
from tidings.tracing import TraceParent, child_of, parse_traceparent, stamp, stamped_json

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_parse_valid_header_and_round_trip() -> None:
    parsed = TraceParent.parse(VALID)
    assert parsed == TraceParent(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, 1)
    assert parsed.sampled and parsed.trace_id_hex == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parsed.header() == VALID
    assert not TraceParent.parse(VALID[:-2] + "00").sampled


def test_a_later_version_may_carry_more_fields() -> None:
    assert TraceParent.parse("01" + VALID[2:] + "-what-comes-next").span_id == 0x00F067AA0BA902B7


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        "00-" + "a" * 32 + "-01",  # no span id
        VALID.upper(),  # hex is lower case
        "ff" + VALID[2:],  # version ff is forbidden
        VALID + "-extra",  # version 00 has exactly four fields
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-" + "0" * 16 + "-01",  # all-zero span id
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # 31 digits
    ],
)
def test_malformed_header_is_a_typed_error_when_given_and_ignored_when_received(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="malformed traceparent"):
        TraceParent.parse(bad)
    assert parse_traceparent(bad) is None
    # A handled event with a bad header: its effects start a new trace instead of failing.
    fresh = TraceParent.parse(child_of({"traceparent": bad})["traceparent"])
    assert fresh.sampled


def test_non_string_header_is_ignored_when_received() -> None:
    assert parse_traceparent(None) is None and parse_traceparent(42) is None


def test_new_traces_are_valid_and_distinct() -> None:
    headers = {TraceParent.new().header() for _ in range(1000)}
    assert len(headers) == 1000
    ids = {TraceParent.parse(h).trace_id for h in headers}
    assert len(ids) == 1000


def test_child_keeps_the_trace_and_flags_with_a_new_span() -> None:
    parent = TraceParent.parse(VALID[:-2] + "00")
    child = parent.child()
    assert (child.trace_id, child.flags) == (parent.trace_id, 0)
    assert child.span_id != parent.span_id


def test_child_of_carries_tracestate_and_makes_one_new_span() -> None:
    with tracing_off():
        keys = child_of({"traceparent": VALID, "tracestate": "vendor=abc"})
    child = TraceParent.parse(keys["traceparent"])
    assert (
        child.trace_id == TraceParent.parse(VALID).trace_id
        and child.span_id != TraceParent.parse(VALID).span_id
    )
    assert keys["tracestate"] == "vendor=abc"


def test_stamp_adds_a_new_trace_keeps_a_given_one_and_refuses_a_bad_one() -> None:
    with tracing_off():
        assert set(stamp(None)) == {"traceparent"}
        assert stamp({"user_id": "ann"})["user_id"] == "ann"
        given = {"traceparent": VALID, "tracestate": "a=b"}
        assert stamp(given) is given
        with pytest.raises(InvalidArgument):
            stamp({"traceparent": "00-nope"})


def test_stamped_json_is_the_encoded_stamp() -> None:
    with tracing_off():
        plain = stamped_json(None, EventRegistry.encode_metadata)
        assert plain is not None
        [(key, value)] = json.loads(plain).items()
        assert key == "traceparent" and TraceParent.parse(value).sampled
        given = {"traceparent": VALID, "user_id": "ann"}
        assert stamped_json(given, EventRegistry.encode_metadata) == EventRegistry.encode_metadata(given)


async def test_append_with_a_bad_traceparent_writes_nothing() -> None:
    async with open_store("memory://") as store:
        with pytest.raises(InvalidArgument, match="malformed traceparent"):
            await store.append("s", [Credited(amount=1)], metadata={"traceparent": "00-bad"})
        assert await store.head() == 0
        await store.append("s", [Credited(amount=1)], metadata={"traceparent": VALID})
        [event] = [e async for e in store.read_stream("s")]
        assert event.metadata["traceparent"] == VALID


def test_spans_start_only_once_a_tracer_provider_is_configured() -> None:
    # This test session sets no global provider: the API's stand-in would record nothing.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert not tracing.enabled()
    provider = TracerProvider()
    try:
        tracing.enable(provider)
        assert tracing.enabled()
        tracing.disable()
        assert not tracing.enabled()
    finally:
        tracing.enable()
        provider.shutdown()
    assert not tracing.enabled()


def test_without_opentelemetry_installed_events_get_trace_context_and_spans_are_off(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import asyncio, sys
        sys.modules["opentelemetry"] = None  # as if the 'otel' extra were not installed
        from tidings import MissingExtra, open_store, tracing
        from tidings.testing.events import Credited

        assert not tracing.enabled()
        try:
            tracing.enable()
        except MissingExtra as exc:
            assert "pip install 'tidings[otel]'" in str(exc)
        else:
            raise AssertionError("enable() without OpenTelemetry")

        async def main():
            async with open_store("memory://") as store:
                await store.append("s", [Credited(amount=1)])
                [event] = [e async for e in store.read_stream("s")]
                print(tracing.TraceParent.parse(event.metadata["traceparent"]).header())

        asyncio.run(main())
        assert not any(name.startswith("opentelemetry.") for name in sys.modules)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert TraceParent.parse(result.stdout.strip()).sampled


class tracing_off:
    """Spans off for a block, whatever the test session configured."""

    def __enter__(self) -> None:
        self.was = tracing.enabled()
        tracing.disable()

    def __exit__(self, *exc: object) -> None:
        if self.was:
            tracing.enable()
