"""A hypothesis state machine: every backend behaves like a simple in-memory model."""

from __future__ import annotations

import asyncio
import tempfile
import uuid

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tidings import ANY, NO_STREAM, STREAM_EXISTS, ConcurrencyError, DuplicateEventId, open_store
from tidings.store import EventStore, ExpectedVersion
from tidings.testing import Credited, Debited

STREAMS = st.sampled_from(["a", "b", "order-1", "order-2"])
EVENTS = st.lists(
    st.builds(Credited, amount=st.integers(-5, 5)) | st.builds(Debited, amount=st.integers(0, 5)),
    max_size=4,
)


class StoreMachine(RuleBasedStateMachine):
    url_template = "memory://"

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        url = self.url_template.format(dir=self.tmp.name)
        self.store: EventStore = self.loop.run_until_complete(open_store(url).open())
        self.log: list[tuple[str, int, object]] = []  # (stream, version, event)
        self.calls: list[tuple[str, list[uuid.UUID], int, int, list[object]]] = []

    def run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def version(self, stream: str) -> int:
        return sum(1 for s, _, _ in self.log if s == stream)

    @rule(stream=STREAMS, events=EVENTS, mode=st.sampled_from(["any", "exact", "stale", "none", "exists"]))
    def append(self, stream: str, events: list[object], mode: str) -> None:
        current = self.version(stream)
        expected: ExpectedVersion = {
            "any": ANY,
            "exact": current,
            "stale": current + 1,
            "none": NO_STREAM,
            "exists": STREAM_EXISTS,
        }[mode]
        ok = {"any": True, "exact": True, "stale": False, "none": current == 0, "exists": current > 0}[mode]
        ids = [uuid.uuid4() for _ in events]
        try:
            result = self.run(self.store.append(stream, events, expected_version=expected, event_ids=ids))
        except ConcurrencyError as exc:
            assert not ok and exc.actual == current
            return
        assert ok
        for i, e in enumerate(events):
            self.log.append((stream, current + i + 1, e))
        assert result.version == self.version(stream)
        if events:
            assert result.position == len(self.log)
            self.calls.append((stream, ids, current, result.position, events))

    @precondition(lambda self: bool(self.calls))
    @rule(data=st.data())
    def retry_or_misuse(self, data: st.DataObject) -> None:
        stream, ids, base, position, events = data.draw(st.sampled_from(self.calls))
        other = data.draw(st.sampled_from(["a", "b", "zzz"]))
        if other == stream:
            result = self.run(self.store.append(stream, events, expected_version=base, event_ids=ids))
            assert (result.version, result.position) == (base + len(events), position)
        else:
            try:
                self.run(self.store.append(other, events, event_ids=ids))
            except DuplicateEventId:
                pass
            else:
                raise AssertionError("reusing event ids in another stream must fail")

    @invariant()
    def matches_model(self) -> None:
        async def read() -> list[tuple[str, int, object]]:
            return [(e.stream_id, e.version, e.event) async for e in self.store.read_all()]

        assert self.run(read()) == self.log
        assert self.run(self.store.head()) == len(self.log)

    @rule(
        stream=STREAMS, after=st.integers(0, 6), backwards=st.booleans(), limit=st.none() | st.integers(0, 3)
    )
    def read_stream(self, stream: str, after: int, backwards: bool, limit: int | None) -> None:
        async def read() -> list[int]:
            return [
                e.version
                async for e in self.store.read_stream(stream, after=after, backwards=backwards, limit=limit)
            ]

        expected = [v for s, v, _ in self.log if s == stream and v > after]
        if backwards:
            expected.reverse()
        if limit is not None:
            expected = expected[:limit]
        assert self.run(read()) == expected

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        self.tmp.cleanup()


class SQLiteMachine(StoreMachine):
    url_template = "sqlite:///{dir}/model.db"


TestMemoryModel = StoreMachine.TestCase
TestMemoryModel.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestSQLiteModel = SQLiteMachine.TestCase
TestSQLiteModel.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)
