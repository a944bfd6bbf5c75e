"""The PostgreSQL store under concurrent writers, killed writers and a restarted server.

What every test here checks is the global log's promise: a live reader that reads after its
checkpoint and waits for more sees every position exactly once, in increasing order -- however
the writers' transactions interleave, stall, die or lose their server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest

from tests import servers
from tidings import AppendResult, ConcurrencyError, EventStore, StoreError, open_store
from tidings.store.postgres import PostgresConfig, PostgresStore
from tidings.testing import Credited, collect

pytestmark = pytest.mark.postgres


def credits(n: int, start: int = 0) -> list[Credited]:
    return [Credited(amount=start + i) for i in range(n)]


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
                await asyncio.sleep(0.1)


async def wait_until_lock_waiters(url: str, count: int) -> None:
    """Return once ``count`` backends wait for a lock in a statement on this URL's schema (fail
    after 60 s). Statements of the store name their schema, which keeps other tests out."""
    deadline = time.monotonic() + 60
    schema = PostgresConfig.from_url(url).schema
    async with await psycopg.AsyncConnection.connect(servers.libpq_url(url), autocommit=True) as conn:
        while True:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND strpos(query, %s) > 0",
                (f'"{schema}".',),
            )
            row = await cur.fetchone()
            if row is not None and row[0] >= count:
                return
            assert time.monotonic() < deadline, f"never saw {count} writers waiting for a lock"
            await asyncio.sleep(0.02)


# -- a transaction that commits late ---------------------------------------------------------------------


async def test_delayed_commit_is_never_skipped(pg_url: str) -> None:
    async with (
        open_store(pg_url) as holder,
        open_store(pg_url) as writer_a,
        open_store(pg_url) as writer_b,
        open_store(pg_url) as reading,
    ):
        assert isinstance(holder, PostgresStore)
        await writer_a.append("seed", credits(10))
        reader = Reader(reading)
        stop = asyncio.Event()
        following = asyncio.create_task(reader.run(stop))

        async def keep_appending(store: EventStore, name: str) -> list[AppendResult]:
            return [await store.append(f"{name}-{i % 3}", credits(10, i)) for i in range(6)]

        async with holder._begin() as tx:
            held = await tx.append(holder.prepare_append("held", credits(5)))
            others = [
                asyncio.create_task(keep_appending(writer_a, "a")),
                asyncio.create_task(keep_appending(writer_b, "b")),
            ]
            # Both writers are now blocked behind the held transaction...
            await wait_until_lock_waiters(pg_url, 2)
            # ...and nothing after the held positions is visible while they are uncommitted.
            assert await reading.head() == 10
            await asyncio.sleep(2)  # hold the commit for two seconds, as the issue describes
            assert await reading.head() == 10
            assert max(reader.positions) == 10
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


# -- many processes, contended streams, expected versions ----------------------------------------------------

PROCESSES = 8
APPENDS_PER_PROCESS = 500
STREAMS = 16

Ack = tuple[str, int, list[str], int]
"""An acknowledged append: (stream, version after it, its event ids, position of its last event)."""


def contended_writer(url: str, seed: int) -> list[Ack]:
    """A writer process: APPENDS_PER_PROCESS appends of 1-3 events to random hot streams, each
    with the expected version it just read, retried on ConcurrencyError."""
    return asyncio.run(_contended_writer(url, seed))


async def _contended_writer(url: str, seed: int) -> list[Ack]:
    rng = random.Random(seed)
    acks: list[Ack] = []
    async with open_store(url) as store:
        for i in range(APPENDS_PER_PROCESS):
            stream = f"hot-{rng.randrange(STREAMS)}"
            n = rng.randint(1, 3)
            ids = [uuid.uuid4() for _ in range(n)]
            while True:
                version = await store.stream_version(stream)
                try:
                    result = await store.append(
                        stream, credits(n, seed * 10_000 + i), expected_version=version, event_ids=ids
                    )
                except ConcurrencyError:
                    continue
                break
            acks.append((stream, result.version, [str(e) for e in ids], result.position))
    return acks


async def test_many_processes_on_contended_streams(pg_url: str) -> None:
    async with open_store(pg_url) as first, open_store(pg_url) as second:
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


# -- a writer killed while it holds the position lock --------------------------------------------------------

VICTIM = textwrap.dedent(
    """
    import asyncio, sys
    from tidings import open_store
    from tidings.testing import Credited

    async def main(url):
        async with open_store(url) as store:
            async with store._begin() as tx:
                await tx.append(store.prepare_append("victim", [Credited(amount=i) for i in range(10)]))
                print("holding", flush=True)
                await asyncio.sleep(3600)

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_writer_killed_mid_transaction_leaves_nothing_and_stalls_nothing(pg_url: str) -> None:
    async with open_store(pg_url) as store, open_store(pg_url) as reading:
        await store.append("before", credits(3))
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
            blocked = asyncio.create_task(store.append("after", credits(4)))
            await wait_until_lock_waiters(pg_url, 1)
            assert not blocked.done()
            victim.send_signal(signal.SIGKILL)
            # The server sees the dead connection, rolls the victim back, and the writer goes on.
            result = await asyncio.wait_for(blocked, 60)
        finally:
            if victim.returncode is None:
                victim.kill()
            await victim.wait()
        assert victim.returncode != 0  # it died (asyncio may report a reaped child as 255, not -9)
        assert (result.version, result.position) == (4, 7)  # the victim's positions were never taken
        await store.append("later", credits(2))
        stop.set()
        await asyncio.wait_for(following, 60)
        assert await collect(reading.read_stream("victim")) == []
        assert reader.positions == list(range(1, 10))
        assert [e.stream_id for e in await collect(reading.read_all())] == ["before"] * 3 + ["after"] * 4 + [
            "later"
        ] * 2


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


async def test_reader_resumes_after_server_restart(private_postgres: servers.PostgresServer) -> None:
    server = private_postgres
    url = servers.with_options(server.url, schema=f"r_{uuid.uuid4().hex}", poll_interval="0.2")
    async with (
        open_store(url) as writer,
        open_store(url) as reading,
        open_store(servers.with_options(url, poll_interval="3600")) as deaf_but_for_notify,
        open_store(servers.with_options(url, pool_timeout="1")) as impatient,
    ):
        reader = Reader(reading)
        stop = asyncio.Event()
        following = asyncio.create_task(reader.run(stop))
        for i in range(20):
            await writer.append(f"s-{i % 3}", credits(2, i))

        await asyncio.to_thread(server.stop)
        if isinstance(server, servers.ThrowawayPostgres):
            # While the server is down, an append fails with a store error (after pool_timeout).
            with pytest.raises(StoreError):
                await impatient.append("down", credits(1))
        await asyncio.to_thread(server.start)

        # Dead pooled connections are replaced transparently: these appends just work.
        for i in range(20, 40):
            await writer.append(f"s-{i % 3}", credits(2, i))
        assert await impatient.stream_version("s-0") > 0
        # The listener has reconnected: a store that (practically) never polls is woken by NOTIFY.
        head = await deaf_but_for_notify.head()
        waiting = asyncio.create_task(deaf_but_for_notify.wait_for_append(head, timeout=None))
        await asyncio.sleep(0.05)
        await writer.append("s-0", credits(1))
        while (seen := await asyncio.wait_for(waiting, 60)) <= head:
            waiting = asyncio.create_task(deaf_but_for_notify.wait_for_append(seen, timeout=None))

        stop.set()
        await asyncio.wait_for(following, 60)
        head = await reading.head()
        assert head == 81
        assert reader.positions == list(range(1, head + 1))
