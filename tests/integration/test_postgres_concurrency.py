"""The PostgreSQL store under concurrent writers, killed writers and a restarted server.

What every test here checks is the global log's promise: a live reader that reads after its
checkpoint and waits for more sees every position exactly once, in increasing order -- however
the writers' transactions interleave, stall, die or lose their server. Each fault test checks it
twice: with a hand-written :class:`Reader`, and with the real subscription runner (a
:class:`Service` with an unfiltered and a filtered handler group, see :class:`Followers`) running
through the fault, whose checkpoints must end at the head.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from tests import servers
from tests.helpers import blocked_wait_for_append, wait_until
from tidings import (
    AppendResult,
    ConcurrencyError,
    EventStore,
    HandlerContext,
    Service,
    StoreError,
    SubscriptionConfig,
    open_store,
)
from tidings.processing.handlers import Dispatch
from tidings.processing.handling import HandlerSubscription
from tidings.store.postgres import PostgresConfig, PostgresStore
from tidings.testing import Credited, Debited, collect

pytestmark = pytest.mark.postgres


def credits(n: int, start: int = 0) -> list[Credited]:
    return [Credited(amount=start + i) for i in range(n)]


def debits(n: int, start: int = 0) -> list[Debited]:
    return [Debited(amount=start + i) for i in range(n)]


class Reader:
    """A live reader of the global log, as a subscription runs one: read everything after the
    checkpoint, then wait for an append; on a store error, back off and carry on."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.positions: list[int] = []
        self.errors = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the log until ``stop`` is set and the reader has caught up with the head."""
        checkpoint = 0
        while True:
            try:
                async for event in self.store.read_all(after=checkpoint):
                    self.positions.append(event.position)
                    checkpoint = event.position
                if stop.is_set() and checkpoint >= await self.store.head():
                    return
                await self.store.wait_for_append(checkpoint, timeout=0.5)
            except StoreError:
                self.errors += 1
                await asyncio.sleep(0.1)  # the reader's back-off after an error (the scenario)


EVERY = "follow.every"
"""The unfiltered group: handles every event type these tests append (Credited, Debited)."""
DEBITS = "follow.debits"
"""The filtered group: handles Debited only, so its checkpoint moves past the Credited events it
skips by the runner's ``scanned = max(head, last)`` rule."""
GROUPS = (EVERY, DEBITS)
FOLLOW = SubscriptionConfig(batch_size=100, poll_interval=0.2)
RESTART_FOLLOW = SubscriptionConfig(batch_size=10, poll_interval=0.2)


class Followers:
    """The real subscription runner following the log: one :class:`Service`, two handler groups.

    Every handler records the position it is given twice: in memory, as delivered (a redelivery
    would show up as a repeat), and (with ``effects``) as an effect through ``ctx.execute``, which
    commits in the same transaction as the group's checkpoint and so must happen exactly once, in
    log order.
    """

    def __init__(
        self,
        store: EventStore,
        *,
        config: SubscriptionConfig = FOLLOW,
        delay: float = 0.0,
        effects: bool = True,
    ) -> None:
        self.store = store
        self.delay = delay
        self.effects = effects
        self.service = Service("follow", store, config=config)
        self.delivered: dict[str, list[int]] = {group: [] for group in GROUPS}

        @self.service.handles(Credited, Debited, group=EVERY)
        async def every(event: Credited | Debited, ctx: HandlerContext) -> None:
            await self.record(ctx)

        @self.service.handles(Debited, group=DEBITS)
        async def debited(event: Debited, ctx: HandlerContext) -> None:
            await self.record(ctx)

    async def record(self, ctx: HandlerContext) -> None:
        if self.delay:
            await asyncio.sleep(self.delay)  # slow enough to be caught mid-batch by a fault
        self.delivered[ctx.group].append(ctx.recorded.position)
        if self.effects:
            ctx.execute(
                "INSERT INTO followed (group_name, position) VALUES (?, ?)",
                (ctx.group, ctx.recorded.position),
            )

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Followers]:
        """Run both groups in the background for the block (after creating their effects table)."""
        await self.create_table()
        async with self.service.running():
            yield self

    async def create_table(self) -> None:
        await self.store.transaction(
            lambda tx: tx.execute(
                "CREATE TABLE IF NOT EXISTS followed "
                "(id bigserial PRIMARY KEY, group_name text NOT NULL, position bigint NOT NULL)"
            )
        )

    async def checkpoints(self) -> dict[str, int]:
        found = await self.store.checkpoints()
        return {group: found.get(group, 0) for group in GROUPS}

    async def wait_for(self, position: int, timeout: float = 60) -> None:
        """Wait until both groups have processed ``position`` (fail with their state if not)."""
        for group in GROUPS:
            if not await self.store.wait_for(position, group=group, timeout=timeout):
                pytest.fail(f"{group} never reached {position}: {self.service.statistics()}")

    async def check(self, *, outage: bool = False) -> None:
        """Wait until both groups have processed the head; then check what each was given.

        Each group's handler saw every position it subscribes to exactly once, in increasing
        order, and its checkpoint is the head. After an ``outage`` of the server, the runners
        have met store errors, and a commit lost to it may have had its events delivered again
        (at-least-once delivery): then the deliveries, repeats removed, must still be exactly
        the expected positions in order -- and the effects committed with the checkpoints must
        still be exactly once.
        """
        head = await self.store.head()
        await self.wait_for(head)
        log = await collect(self.store.read_all())
        assert [e.position for e in log] == list(range(1, head + 1))
        expected = {
            EVERY: [e.position for e in log],
            DEBITS: [e.position for e in log if isinstance(e.event, Debited)],
        }
        assert expected[DEBITS], "the filtered group has nothing to check"
        assert len(expected[DEBITS]) < head, "the filtered group filters nothing out"
        rows = await self.store.query("SELECT group_name, position FROM followed ORDER BY id")
        for group in GROUPS:
            delivered = self.delivered[group]
            if outage:
                assert list(dict.fromkeys(delivered)) == expected[group], group
            else:
                assert delivered == expected[group], group
            if self.effects:
                assert [int(p) for g, p in rows if g == group] == expected[group], f"{group}: effects"
        assert await self.checkpoints() == dict.fromkeys(GROUPS, head)
        for stats in self.service.statistics():
            assert stats.state in ("live", "catching up"), stats  # the runners are alive
            assert stats.dead_lettered == 0, stats
            if not outage:
                assert stats.last_error is None, stats


async def wait_until_lock_waiters(url: str, count: int) -> None:
    """Return once ``count`` backends wait for a lock in a statement on this URL's schema (fail
    after 60 s). Statements of the store name their schema, which keeps other tests out."""
    schema = PostgresConfig.from_url(url).schema
    async with await psycopg.AsyncConnection.connect(servers.libpq_url(url), autocommit=True) as conn:

        async def waiting() -> bool:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND strpos(query, %s) > 0",
                (f'"{schema}".',),
            )
            row = await cur.fetchone()
            return row is not None and row[0] >= count

        await wait_until(waiting, 60, f"{count} writers waiting for a lock")


# -- a transaction that commits late ---------------------------------------------------------------------


async def test_delayed_commit_is_never_skipped(pg_url: str) -> None:
    async with (
        open_store(pg_url) as holder,
        open_store(pg_url) as writer_a,
        open_store(pg_url) as writer_b,
        open_store(pg_url) as reading,
        open_store(pg_url) as subscribing,
        Followers(subscribing).running() as followers,
    ):
        assert isinstance(holder, PostgresStore)
        await writer_a.append("seed", credits(10))
        reader = Reader(reading)
        stop = asyncio.Event()
        following = asyncio.create_task(reader.run(stop))
        # Both groups are at the head before the hold: the filtered one only by skipping.
        await followers.wait_for(10)

        async def keep_appending(
            store: EventStore, name: str, make: type[Credited | Debited]
        ) -> list[AppendResult]:
            return [
                await store.append(f"{name}-{i % 3}", [make(amount=i * 10 + k) for k in range(10)])
                for i in range(6)
            ]

        async with holder._begin() as tx:
            # The held events are of the filtered group's type: a filtered runner that moved its
            # checkpoint past positions still uncommitted would never see them.
            held = await tx.append(holder.prepare_append("held", debits(5)))
            others = [
                asyncio.create_task(keep_appending(writer_a, "a", Credited)),
                asyncio.create_task(keep_appending(writer_b, "b", Debited)),
            ]
            # Both writers are now blocked behind the held transaction...
            await wait_until_lock_waiters(pg_url, 2)
            # ...and nothing after the held positions is visible while they are uncommitted.
            assert await reading.head() == 10
            await asyncio.sleep(2)  # hold the commit for two seconds, as the issue describes
            assert await reading.head() == 10
            assert max(reader.positions) == 10
            # The subscriptions, live all along, have not moved past what is committed.
            assert await followers.checkpoints() == dict.fromkeys(GROUPS, 10)
            assert followers.delivered == {EVERY: list(range(1, 11)), DEBITS: []}
        results = [r for task in others for r in await asyncio.wait_for(task, 60)]

        stop.set()
        await asyncio.wait_for(following, 60)
        head = await reading.head()
        assert head == 10 + 5 + 2 * 6 * 10
        assert reader.positions == list(range(1, head + 1))
        # Commit order is position order: the held append got the lower positions.
        assert held.position == 15
        assert all(r.position > 15 for r in results)
        assert [e.position for e in await collect(reading.read_stream("held"))] == [11, 12, 13, 14, 15]
        await followers.check()
        assert followers.delivered[DEBITS][:5] == [11, 12, 13, 14, 15]


# -- many processes, contended streams, expected versions ----------------------------------------------------

PROCESSES = 8
APPENDS_PER_PROCESS = 500
STREAMS = 16

Ack = tuple[str, int, list[str], int]
"""An acknowledged append: (stream, version after it, its event ids, position of its last event)."""


def contended_writer(url: str, seed: int) -> list[Ack]:
    """A writer process: APPENDS_PER_PROCESS appends of 1-3 events to random hot streams, each
    with the expected version it just read, retried on ConcurrencyError. Odd-numbered streams
    get Debited events (the filtered group's), even-numbered ones Credited."""
    return asyncio.run(_contended_writer(url, seed))


async def _contended_writer(url: str, seed: int) -> list[Ack]:
    rng = random.Random(seed)
    acks: list[Ack] = []
    async with open_store(url) as store:
        for i in range(APPENDS_PER_PROCESS):
            number = rng.randrange(STREAMS)
            stream = f"hot-{number}"
            make = debits if number % 2 else credits
            n = rng.randint(1, 3)
            ids = [uuid.uuid4() for _ in range(n)]
            while True:
                version = await store.stream_version(stream)
                try:
                    result = await store.append(
                        stream, make(n, seed * 10_000 + i), expected_version=version, event_ids=ids
                    )
                except ConcurrencyError:
                    continue
                break
            acks.append((stream, result.version, [str(e) for e in ids], result.position))
    return acks


async def test_many_processes_on_contended_streams(pg_url: str) -> None:
    async with (
        open_store(pg_url) as first,
        open_store(pg_url) as second,
        open_store(pg_url) as subscribing,
        # No ctx.execute effects here: on two cores shared with eight writer processes, effect
        # statements (run from a worker thread, a hand-off to the loop each) slowed the runners
        # tenfold, so they only caught up after the writers were done -- instead of following
        # right at the head, where positions are still uncommitted, which is what this is for.
        Followers(subscribing, effects=False).running() as followers,
    ):
        readers = [Reader(first), Reader(second)]
        stop = asyncio.Event()
        following = [asyncio.create_task(r.run(stop)) for r in readers]
        loop = asyncio.get_running_loop()
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(PROCESSES, mp_context=context) as pool:
            jobs = [loop.run_in_executor(pool, contended_writer, pg_url, seed) for seed in range(PROCESSES)]
            acks = [ack for job in await asyncio.wait_for(asyncio.gather(*jobs), 300) for ack in job]
        stop.set()
        await asyncio.wait_for(asyncio.gather(*following), 60)

        assert len(acks) == PROCESSES * APPENDS_PER_PROCESS
        log = await collect(first.read_all())
        total = sum(len(ids) for _, _, ids, _ in acks)
        assert [e.position for e in log] == list(range(1, total + 1))  # nothing lost, nothing extra
        by_position = {e.position: e for e in log}
        streams: dict[str, list[int]] = {}
        for e in log:
            streams.setdefault(e.stream_id, []).append(e.version)
        for stream, versions in streams.items():
            assert versions == list(range(1, len(versions) + 1)), f"{stream}: versions {versions}"
        for stream, version, ids, position in acks:
            # every acknowledged event is where the acknowledgement says, contiguous in the log
            for k, event_id in enumerate(reversed(ids)):
                stored = by_position[position - k]
                assert (stored.stream_id, stored.version, str(stored.event_id)) == (
                    stream,
                    version - k,
                    event_id,
                )
        for reader in readers:
            assert reader.positions == list(range(1, total + 1))
        await followers.check()


# -- a writer killed while it holds the position lock --------------------------------------------------------

VICTIM = textwrap.dedent(
    """
    import asyncio, sys
    from tidings import open_store
    from tidings.testing import Debited

    async def main(url):
        async with open_store(url) as store:
            async with store._begin() as tx:
                await tx.append(store.prepare_append("victim", [Debited(amount=i) for i in range(10)]))
                print("holding", flush=True)
                await asyncio.sleep(3600)  # hold the lock until killed (the scenario)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_writer_killed_mid_transaction_leaves_nothing_and_stalls_nothing(pg_url: str) -> None:
    async with (
        open_store(pg_url) as store,
        open_store(pg_url) as reading,
        open_store(pg_url) as subscribing,
        Followers(subscribing).running() as followers,
    ):
        await store.append("before", credits(3))
        await followers.wait_for(3)
        victim = await asyncio.create_subprocess_exec(
            sys.executable, "-c", VICTIM, pg_url, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            assert victim.stdout is not None and victim.stderr is not None
            line = await asyncio.wait_for(victim.stdout.readline(), 60)
            assert line.strip() == b"holding", (line + await victim.stderr.read()).decode()
            reader = Reader(reading)
            stop = asyncio.Event()
            following = asyncio.create_task(reader.run(stop))
            blocked = asyncio.create_task(store.append("after", debits(4)))
            await wait_until_lock_waiters(pg_url, 1)
            assert not blocked.done()
            # The victim's uncommitted (Debited) events hold positions 4-13: no group passes 3.
            assert await followers.checkpoints() == dict.fromkeys(GROUPS, 3)
            victim.send_signal(signal.SIGKILL)
            # The server sees the dead connection, rolls the victim back, and the writer goes on.
            result = await asyncio.wait_for(blocked, 60)
        finally:
            if victim.returncode is None:
                victim.kill()
            await victim.wait()
        # It died by the signal, while holding the lock (it never printed more than "holding").
        assert victim.returncode in (-signal.SIGKILL, 255), victim.returncode  # asyncio may report 255
        assert (result.version, result.position) == (4, 7)  # the victim's positions were never taken
        await store.append("later", credits(2))
        stop.set()
        await asyncio.wait_for(following, 60)
        assert await collect(reading.read_stream("victim")) == []
        assert reader.positions == list(range(1, 10))
        assert [e.stream_id for e in await collect(reading.read_all())] == ["before"] * 3 + ["after"] * 4 + [
            "later"
        ] * 2
        await followers.check()
        assert followers.delivered[DEBITS] == [4, 5, 6, 7]


# -- the server restarts under a running reader ------------------------------------------------------------


@pytest.fixture
def private_postgres() -> Iterator[servers.PostgresServer]:
    """A server of this test's own, which it may stop and start (an external one is only
    disconnected from, see :class:`tests.servers.ExternalPostgres`)."""
    url = os.environ.get(servers.ENV_URL)
    try:
        server: servers.PostgresServer = (
            servers.ExternalPostgres(url) if url else servers.ThrowawayPostgres.create()
        )
    except Exception as exc:
        pytest.fail(f"cannot start a PostgreSQL server for the restart test: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.close()


def two_of(i: int) -> list[Credited] | list[Debited]:
    """Stream ``s-{i % 3}``'s next two events: s-1 gets Debited, the others Credited."""
    return debits(2, i) if i % 3 == 1 else credits(2, i)


async def test_reader_resumes_after_server_restart(private_postgres: servers.PostgresServer) -> None:
    server = private_postgres
    url = servers.with_options(server.url, schema=f"r_{uuid.uuid4().hex}", poll_interval="0.2")
    async with (
        open_store(url) as writer,
        open_store(url) as reading,
        open_store(servers.with_options(url, poll_interval="3600")) as deaf_but_for_notify,
        open_store(servers.with_options(url, pool_timeout="1")) as impatient,
        # Slow handlers and small batches: the runners are mid-batch when the server goes away,
        # and (with a short pool_timeout) see store errors for as long as it is away.
        open_store(servers.with_options(url, pool_timeout="0.2")) as subscribing,
        Followers(subscribing, config=RESTART_FOLLOW, delay=0.05).running() as followers,
    ):
        reader = Reader(reading)
        stop = asyncio.Event()
        following = asyncio.create_task(reader.run(stop))
        for i in range(20):
            await writer.append(f"s-{i % 3}", two_of(i))
        # Both groups have committed some progress, and (40 events at 50 ms each) the unfiltered
        # one is still busy with the rest when the server goes away.
        await followers.wait_for(10)
        assert (await followers.checkpoints())[EVERY] < 40

        await asyncio.to_thread(server.stop)
        if isinstance(server, servers.ThrowawayPostgres):
            # While the server is down, an append fails with a store error (after pool_timeout).
            with pytest.raises(StoreError):
                await impatient.append("down", credits(1))
        await asyncio.to_thread(server.start)

        # Dead pooled connections are replaced transparently: these appends just work.
        for i in range(20, 40):
            await writer.append(f"s-{i % 3}", two_of(i))
        assert await impatient.stream_version("s-0") > 0
        # The listener has reconnected: a store that (practically) never polls is woken by NOTIFY.
        head = await deaf_but_for_notify.head()
        waiting = await blocked_wait_for_append(deaf_but_for_notify, head)
        await writer.append("s-0", credits(1))
        while (seen := await asyncio.wait_for(waiting, 60)) <= head:
            waiting = asyncio.create_task(deaf_but_for_notify.wait_for_append(seen, timeout=None))

        stop.set()
        await asyncio.wait_for(following, 60)
        head = await reading.head()
        assert head == 81
        assert reader.positions == list(range(1, head + 1))
        # The runners recovered on their own: every position handled, effects exactly once,
        # checkpoints at the head (the last event is Credited: the filtered group skips to it).
        await followers.check(outage=True)
        if isinstance(server, servers.ThrowawayPostgres):
            # ...after the unfiltered group's runner did meet the outage.
            stats = {s.group: s for s in followers.service.statistics()}
            error = stats[EVERY].last_error or ""
            assert error.startswith(("StoreError", "StoreUnavailable")), stats[EVERY]


# -- runners meeting an outage while they load their state ----------------------------------------


async def test_subscription_started_while_the_server_is_down_waits_for_it(
    private_postgres: servers.PostgresServer,
) -> None:
    """``Subscription.run`` promises that store errors never end the runner. A runner that starts
    (or takes over as a hot standby, or reloads its checkpoint after a conflict) while the server
    is briefly away must retry until it is back, like one that meets the outage mid-batch."""
    server = private_postgres
    if not isinstance(server, servers.ThrowawayPostgres):
        pytest.skip("needs a server this test can stop")  # an external one is only disconnected from
    url = servers.with_options(server.url, schema=f"r_{uuid.uuid4().hex}", poll_interval="0.2")
    async with (
        open_store(url) as writer,
        open_store(servers.with_options(url, pool_timeout="0.2")) as subscribing,
    ):
        await writer.append("s", [*debits(2), *credits(2)])
        followers = Followers(subscribing)
        await followers.create_table()
        await asyncio.to_thread(server.stop)
        try:
            async with followers.service.running():
                # The runners start, and meet the outage (the fault really happened).
                service = followers.service
                await wait_until(
                    lambda: all(s.last_error for s in service.statistics()),
                    60,
                    lambda: f"both runners to meet the outage: {service.statistics()}",
                )
                errors = [s.last_error or "" for s in service.statistics()]
                assert all(e.startswith(("StoreError", "StoreUnavailable")) for e in errors), errors
                await asyncio.to_thread(server.start)
                # The runners met the outage while loading their checkpoints: they must be
                # waiting for the server, not ended.
                assert [s.state for s in followers.service.statistics()] != ["stopped", "stopped"]
                await followers.check(outage=True)
        finally:
            await asyncio.to_thread(server.start)


async def test_subscription_survives_the_server_going_away_after_a_checkpoint_conflict(
    private_postgres: servers.PostgresServer,
) -> None:
    """A conflict (another runner of the group committed first: normal with a runner per process)
    followed by an outage before the checkpoint is reloaded must not end the runner either."""
    server = private_postgres
    if not isinstance(server, servers.ThrowawayPostgres):
        pytest.skip("needs a server this test can stop")
    url = servers.with_options(server.url, schema=f"r_{uuid.uuid4().hex}", poll_interval="0.2")
    entered, gate, conflicted = asyncio.Event(), asyncio.Event(), asyncio.Event()
    handled: list[int] = []

    async def handle(event: Debited, ctx: HandlerContext) -> None:
        entered.set()
        await gate.wait()
        handled.append(ctx.recorded.position)

    class ServerGoesAwayOnConflict(HandlerSubscription):
        async def on_conflict(self) -> None:
            # The documented hook runs between the conflict and the checkpoint's reload: the
            # moment at which the server goes away in this test.
            await asyncio.to_thread(server.stop)
            conflicted.set()

    async with (
        open_store(url) as writer,
        open_store(servers.with_options(url, pool_timeout="0.2")) as subscribing,
    ):
        await writer.append("s", debits(2))
        runner = ServerGoesAwayOnConflict(
            subscribing, "conflicted", Dispatch({Debited: handle}), config=FOLLOW
        )
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.wait_for(entered.wait(), 60)
            await writer.set_checkpoint("conflicted", 1)  # another runner committed position 1
            gate.set()
            await asyncio.wait_for(conflicted.wait(), 60)  # the conflict, then the outage
            # The reload after the conflict fails (the runner met the outage)...
            error = await wait_until(
                lambda: task.done() or runner.statistics().last_error,
                60,
                lambda: f"the runner to meet the outage: {runner.statistics()}",
            )
            # ...and the runner waits for the server, it does not end.
            assert not task.done(), task.exception()
            assert str(error).startswith(("StoreError", "StoreUnavailable")), error
            await asyncio.to_thread(server.start)
            assert await subscribing.wait_for(2, group="conflicted", timeout=60)
            assert handled[-1] == 2
        finally:
            await asyncio.to_thread(server.start)
            runner.stop()
            with contextlib.suppress(StoreError):
                await asyncio.wait_for(task, 60)
