"""Contract suites for the store's processing and SQL capabilities, one per capability layer.

A backend that is a :class:`~tidings.store.TrackingStore` certifies that layer by subclassing
:class:`TrackingContract`; a :class:`~tidings.store.SQLStore` also subclasses :class:`SQLContract`.
Each suite has its own ``make_store`` hook returning an **opened, empty** store::

    class TestMyTracking(TrackingContract):
        async def make_store(self, tmp_path):
            return await open_store(f"mine://{tmp_path}/x").open()

Requires pytest and pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tidings.errors import (
    AlreadyProcessed,
    CheckpointConflict,
    ConcurrencyError,
    IntegrityError,
    InvalidArgument,
    StatementError,
)
from tidings.store.tracking import (
    DeadLetterRecord,
    ProcessedBatch,
    ProjectionGeneration,
    SQLStore,
    TrackingStore,
    Tx,
    save_generation,
)
from tidings.testing.events import Credited

__all__ = ["SQLContract", "TrackingContract"]


def _dead(position: int, event_id: uuid.UUID, error: str = "boom") -> DeadLetterRecord:
    return DeadLetterRecord(position, event_id, "s", Credited.__event_type__, error, "traceback", 1)


class TrackingContract:
    """Behaviour every :class:`~tidings.store.TrackingStore` must have: checkpoints, inbox, dead
    letters and the atomic commit of a subscription step."""

    async def make_store(self, tmp_path: Path) -> TrackingStore:
        """Return an opened, empty store. Subclasses implement this."""
        raise NotImplementedError

    @pytest.fixture
    async def tracking(self, tmp_path: Path) -> AsyncIterator[TrackingStore]:
        store = await self.make_store(tmp_path)
        try:
            yield store
        finally:
            await store.close()

    async def test_a_step_commits_its_appends_inbox_and_checkpoint_together(
        self, tracking: TrackingStore
    ) -> None:
        await tracking.append("in", [Credited(amount=1)])
        [recorded] = [e async for e in tracking.read_all()]
        out = tracking.prepare_append("out", [Credited(amount=2)])
        results = await tracking.commit_processed(
            ProcessedBatch(
                "g",
                expected_checkpoint=0,
                checkpoint=1,
                appends=(out,),
                processed=((recorded.event_id, 1),),
            )
        )
        assert [(r.version, r.position) for r in results] == [(1, 2)]
        assert await tracking.load_checkpoint("g") == 1
        assert await tracking.checkpoints() == {"g": 1}
        assert await tracking.processed_ids("g", [recorded.event_id, uuid.uuid4()]) == {recorded.event_id}
        assert await tracking.processed_ids("other", [recorded.event_id]) == set()

    async def test_a_failing_step_writes_nothing(self, tracking: TrackingStore) -> None:
        await tracking.append("s", [Credited(amount=1)])
        with pytest.raises(CheckpointConflict):
            await tracking.commit_processed(ProcessedBatch("g", expected_checkpoint=5, checkpoint=6))
        stale = tracking.prepare_append("s", [Credited(amount=2)], expected_version=0)
        fine = tracking.prepare_append("t", [Credited(amount=3)])
        with pytest.raises(ConcurrencyError):
            await tracking.commit_processed(
                ProcessedBatch(
                    "g",
                    expected_checkpoint=0,
                    checkpoint=1,
                    appends=(fine, stale),
                    dead_letters=(_dead(1, uuid.uuid4()),),
                )
            )
        assert await tracking.load_checkpoint("g") == 0
        assert await tracking.head() == 1
        assert await tracking.dead_letters() == []

    async def test_an_event_already_in_the_inbox_commits_nothing(self, tracking: TrackingStore) -> None:
        """A second delivery of an event (a bus message handled twice) must not commit its effects."""
        event_id = uuid.uuid4()
        first = tracking.prepare_append("effects", [Credited(amount=1)])
        await tracking.commit_processed(
            ProcessedBatch(
                "g", expected_checkpoint=0, checkpoint=0, appends=(first,), processed=((event_id, 0),)
            )
        )
        again = tracking.prepare_append("effects", [Credited(amount=1)])
        with pytest.raises(AlreadyProcessed) as raised:
            await tracking.commit_processed(
                ProcessedBatch(
                    "g",
                    expected_checkpoint=0,
                    checkpoint=0,
                    appends=(again,),
                    processed=((uuid.uuid4(), 0), (event_id, 0)),
                )
            )
        assert raised.value.event_ids == [event_id]
        assert await tracking.stream_version("effects") == 1
        # Another group's inbox is its own.
        await tracking.commit_processed(
            ProcessedBatch("h", expected_checkpoint=0, checkpoint=0, processed=((event_id, 0),))
        )

    async def test_dead_letters_are_parked_updated_and_removed(self, tracking: TrackingStore) -> None:
        event_id = uuid.uuid4()
        await tracking.commit_processed(
            ProcessedBatch("g", expected_checkpoint=0, checkpoint=3, dead_letters=(_dead(3, event_id),))
        )
        [parked] = await tracking.dead_letters()
        assert (parked.group, parked.position, parked.event_id, parked.attempts) == ("g", 3, event_id, 1)
        # Failing again updates the same entry: same id, attempts added up, the latest error.
        await tracking.commit_processed(
            ProcessedBatch(
                "g", expected_checkpoint=3, checkpoint=3, dead_letters=(_dead(3, event_id, "again"),)
            )
        )
        [again] = await tracking.dead_letters("g")
        assert (again.id, again.attempts, again.error) == (parked.id, 2, "again")
        assert await tracking.dead_letter(parked.id) == again
        assert await tracking.dead_letters("other") == []
        await tracking.commit_processed(
            ProcessedBatch("g", expected_checkpoint=3, checkpoint=3, remove_dead_letter=parked.id)
        )
        assert await tracking.dead_letter(parked.id) is None
        await tracking.commit_processed(
            ProcessedBatch("g", expected_checkpoint=3, checkpoint=3, dead_letters=(_dead(3, uuid.uuid4()),))
        )
        [other] = await tracking.dead_letters()
        assert await tracking.discard_dead_letter(other.id)
        assert not await tracking.discard_dead_letter(other.id)

    async def test_dead_letters_are_paged_counted_and_found_by_event(self, tracking: TrackingStore) -> None:
        ids = [uuid.uuid4() for _ in range(5)]
        for group, chunk in (("a", ids[:3]), ("b", ids[3:])):
            await tracking.commit_processed(
                ProcessedBatch(
                    group,
                    expected_checkpoint=0,
                    checkpoint=9,
                    dead_letters=tuple(_dead(i + 1, e) for i, e in enumerate(chunk)),
                )
            )
        every = await tracking.dead_letters()
        first = await tracking.dead_letters(limit=2)
        rest = await tracking.dead_letters(after_id=first[-1].id, limit=10)
        assert first + rest == every and len(every) == 5
        assert [d.event_id for d in await tracking.dead_letters("a", after_id=first[0].id)] == ids[1:3]
        assert await tracking.dead_letters(limit=0) == []
        assert (await tracking.count_dead_letters(), await tracking.count_dead_letters("b")) == (5, 2)
        assert await tracking.count_dead_letters("nobody") == 0
        wanted = [ids[4], ids[0], uuid.uuid4()]
        assert {d.event_id for d in await tracking.dead_letters_of(wanted)} == {ids[0], ids[4]}
        assert await tracking.dead_letters_of([]) == []
        many = [uuid.uuid4() for _ in range(1_200)] + [ids[2]]  # more than one chunk
        assert [d.event_id for d in await tracking.dead_letters_of(many)] == [ids[2]]
        for bad in ({"after_id": -1}, {"limit": -1}, {"limit": True}):
            with pytest.raises(InvalidArgument):
                await tracking.dead_letters(**bad)
        with pytest.raises(InvalidArgument):
            await tracking.dead_letters_of(["not-a-uuid"])  # type: ignore[list-item]

    async def test_set_checkpoint_moves_or_resets_a_group(self, tracking: TrackingStore) -> None:
        event_id = uuid.uuid4()
        await tracking.commit_processed(
            ProcessedBatch("g", expected_checkpoint=0, checkpoint=4, processed=((event_id, 4),))
        )
        await tracking.set_checkpoint("g", 9)
        assert await tracking.load_checkpoint("g") == 9
        await tracking.set_checkpoint("g", None)  # replay from the start: the inbox goes too
        assert await tracking.load_checkpoint("g") == 0
        assert await tracking.processed_ids("g", [event_id]) == set()

    async def test_wait_for_sees_committed_checkpoints(self, tracking: TrackingStore) -> None:
        assert not await tracking.wait_for(1, group="g", timeout=0.05)
        await tracking.commit_processed(ProcessedBatch("g", expected_checkpoint=0, checkpoint=2))
        assert await tracking.wait_for(1, group="g", timeout=5)

    async def test_groups_are_validated_and_locked_per_database(self, tracking: TrackingStore) -> None:
        for bad in ["", "x" * 201, "a\x00b", "a\ud800", 7]:
            with pytest.raises(InvalidArgument):
                await tracking.load_checkpoint(bad)  # type: ignore[arg-type]
        assert tracking.group_lock("g") is tracking.group_lock("g")
        assert tracking.group_lock("g") is not tracking.group_lock("h")


class SQLContract:
    """Behaviour every :class:`~tidings.store.SQLStore` must have: SQL transactions and queries on
    the store's database, committed atomically with a subscription step, with driver errors
    translated into tidings' own."""

    async def make_store(self, tmp_path: Path) -> SQLStore:
        """Return an opened, empty store. Subclasses implement this."""
        raise NotImplementedError

    @pytest.fixture
    async def sql(self, tmp_path: Path) -> AsyncIterator[SQLStore]:
        store = await self.make_store(tmp_path)
        try:
            yield store
        finally:
            await store.close()

    async def test_transactions_commit_or_roll_back_as_a_whole(self, sql: SQLStore) -> None:
        await sql.transaction(lambda tx: tx.execute("CREATE TABLE kv (k TEXT PRIMARY KEY, v INTEGER)"))
        await sql.transaction(lambda tx: tx.executemany("INSERT INTO kv VALUES (?, ?)", [("a", 1), ("b", 2)]))

        def half(tx: Tx) -> None:
            tx.execute("INSERT INTO kv VALUES (?, ?)", ("c", 3))
            raise RuntimeError("changed my mind")

        with pytest.raises(RuntimeError):
            await sql.transaction(half)
        assert await sql.query("SELECT k, v FROM kv ORDER BY k") == [("a", 1), ("b", 2)]
        assert await sql.transaction(lambda tx: tx.fetchone("SELECT v FROM kv WHERE k = ?", ("b",))) == (2,)

    async def test_work_commits_with_the_checkpoint(self, sql: SQLStore) -> None:
        await sql.transaction(lambda tx: tx.execute("CREATE TABLE seen (n INTEGER)"))

        def work(tx: Tx) -> None:
            tx.execute("INSERT INTO seen VALUES (?)", (1,))

        await sql.commit_processed(ProcessedBatch("g", expected_checkpoint=0, checkpoint=1, work=work))
        with pytest.raises(CheckpointConflict):
            await sql.commit_processed(ProcessedBatch("g", expected_checkpoint=0, checkpoint=2, work=work))
        assert await sql.query("SELECT n FROM seen") == [(1,)]
        assert await sql.load_checkpoint("g") == 1

    async def test_driver_errors_say_whether_to_retry(self, sql: SQLStore) -> None:
        with pytest.raises(StatementError) as statement:
            await sql.query("SELECT * FROM no_such_table")
        assert statement.value.permanent and statement.value.__cause__ is not None
        with pytest.raises(StatementError):
            await sql.transaction(lambda tx: tx.execute("SELEC nonsense"))
        await sql.transaction(lambda tx: tx.execute("CREATE TABLE once (id TEXT PRIMARY KEY)"))
        await sql.transaction(lambda tx: tx.execute("INSERT INTO once VALUES ('x')"))
        with pytest.raises(IntegrityError) as integrity:
            await sql.transaction(lambda tx: tx.execute("INSERT INTO once VALUES ('x')"))
        assert not integrity.value.permanent and not integrity.value.transient

    async def test_projection_catalog(self, sql: SQLStore) -> None:
        assert await sql.projection_generations() == []
        await sql.transaction(lambda tx: save_generation(tx, ProjectionGeneration("b", 1)))
        await sql.transaction(lambda tx: save_generation(tx, ProjectionGeneration("a", 2, building=3)))
        assert await sql.projection_generations() == [
            ProjectionGeneration("a", 2, 3),
            ProjectionGeneration("b", 1, None),
        ]
        assert await sql.projection_generation("a") == ProjectionGeneration("a", 2, 3)
        assert await sql.projection_generation("c") is None
