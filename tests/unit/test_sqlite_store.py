"""SQLite-specific behaviour: files, options, corrupt input, several processes."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tidings import CorruptStore, InvalidArgument, StoreError, open_store
from tidings.store.sqlite import SQLiteConfig, SQLiteStore
from tidings.testing import Credited, collect


def test_url_parsing() -> None:
    assert SQLiteConfig.from_url("sqlite:///rel/x.db").path == "rel/x.db"
    assert SQLiteConfig.from_url("sqlite:////abs/x.db").path == "/abs/x.db"
    assert SQLiteConfig.from_url("sqlite:///x.db?synchronous=normal").synchronous == "normal"
    for bad in [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///x.db?synchronous=off",
        "sqlite:///x.db?bogus=1",
        "sqlite:///x.db?busy_timeout=soon",
    ]:
        with pytest.raises(InvalidArgument):
            SQLiteConfig.from_url(bad)
    with pytest.raises(InvalidArgument):
        open_store("mysql://x")


async def test_durability_pragmas(tmp_path: Path) -> None:
    for option, expected in [("", 2), ("?synchronous=normal", 1)]:
        store = open_store(f"sqlite:///{tmp_path}/d{expected}.db{option}")
        assert isinstance(store, SQLiteStore)
        async with store:
            assert await store.query("PRAGMA journal_mode") == [("wal",)]
            # The writer's connection carries the durability setting.
            level = await store.write(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
            assert level == expected


async def test_concurrent_appends_share_transactions(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/g.db")
    assert isinstance(store, SQLiteStore)
    async with store:
        await asyncio.gather(*(store.append(f"s-{i}", [Credited(amount=i)] * 10) for i in range(64)))
        stats = store.statistics()
        assert (stats.appends, stats.events) == (64, 640)
        assert stats.transactions < 64  # group commit: several appends per transaction
        assert [e.position async for e in store.read_all()] == list(range(1, 641))


async def test_not_a_database_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(CorruptStore) as info:
        await open_store(f"sqlite:///{path}").open()
    assert "junk.db" in str(info.value)
    assert path.read_bytes() == b"this is not sqlite at all" * 100


async def test_foreign_sqlite_database(tmp_path: Path) -> None:
    path = tmp_path / "foreign.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(CorruptStore) as info:
        await open_store(f"sqlite:///{path}").open()
    assert "not a tidings store" in str(info.value)
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"customers"}


async def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"
    async with open_store(url) as store:
        await store.append("s", [Credited(amount=1)])
    with sqlite3.connect(tmp_path / "s.db") as conn:
        conn.execute("UPDATE tidings_meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(CorruptStore) as info:
        await open_store(url).open()
    assert "99" in str(info.value)


async def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        await open_store(f"sqlite:///{tmp_path}/nope/x.db").open()
    assert "does not exist" in str(info.value)


async def test_reopen_keeps_events(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    async with open_store(url) as store:
        await store.append("s", [Credited(amount=1), Credited(amount=2)])
    async with open_store(url) as store:
        assert [e.event for e in await collect(store.read_stream("s"))] == [
            Credited(amount=1),
            Credited(amount=2),
        ]
        assert (await store.append("s", [Credited(amount=3)], expected_version=2)).position == 3


_WRITER = """
import asyncio, sys
from tidings import open_store
from tidings.testing import Credited

async def main(url, name, n):
    async with open_store(url) as store:
        for i in range(n):
            await store.append(f"{name}-{i % 4}", [Credited(amount=i)] * 3)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_several_processes_share_one_file(tmp_path: Path) -> None:
    """Writers in other processes interleave without gaps; this process is woken by their commits."""
    url = f"sqlite:///{tmp_path}/shared.db"
    async with open_store(url) as store:
        waiter = asyncio.create_task(store.wait_for_append(0, timeout=30))
        procs = [
            await asyncio.create_subprocess_exec(sys.executable, "-c", _WRITER, url, f"p{i}", "50")
            for i in range(3)
        ]
        assert [await p.wait() for p in procs] == [0, 0, 0]
        assert await asyncio.wait_for(waiter, 30) > 0
        events = await collect(store.read_all())
        assert [e.position for e in events] == list(range(1, 451))
        for name in ("p0", "p1", "p2"):
            for k in range(4):
                versions = [e.version async for e in store.read_stream(f"{name}-{k}")]
                assert versions == list(range(1, len(versions) + 1))
                assert len(versions) in (36, 39)


def test_open_in_subprocess_without_extras() -> None:
    """Opening the embedded default needs nothing beyond the base install."""
    out = subprocess.run(
        [sys.executable, "-c", "import tidings.store.sqlite, sys; print('psycopg' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


async def test_one_bad_append_in_a_group_commit_fails_only_itself(tmp_path: Path) -> None:
    """Appends merged into one transaction: a value SQLite cannot bind fails its own call only."""
    async with open_store(f"sqlite:///{tmp_path}/gc.db") as store:
        results = await asyncio.gather(
            *(store.append(f"s-{i}", [Credited(amount=i)]) for i in range(8)),
            store.append("bad-\ud800", [Credited(amount=99)]),
            *(store.append(f"t-{i}", [Credited(amount=i)]) for i in range(8)),
            return_exceptions=True,
        )
        assert isinstance(results[8], InvalidArgument)
        good = results[:8] + results[9:]
        assert all(not isinstance(r, BaseException) for r in good), good
        assert await store.head() == 16
        assert sorted([e.stream_id async for e in store.read_all()]) == sorted(
            [f"s-{i}" for i in range(8)] + [f"t-{i}" for i in range(8)]
        )


async def test_known_head_follows_commits_and_never_passes_the_real_head(tmp_path: Path) -> None:
    """The head a commit's wake-up carries is what live readers use instead of asking the
    database; it must never name a position that is not committed, or a reader would skip it."""
    from tidings import NO_STREAM, ConcurrencyError

    url = f"sqlite:///{tmp_path}/k.db"
    async with open_store(url) as store, open_store(url) as other:
        assert store.known_head() == 0
        first = await store.append("s-1", [Credited(amount=1)] * 3)
        assert store.known_head() == first.position == 3
        # Appends that fail (in one group commit with one that succeeds) move nothing.
        results = await asyncio.gather(
            store.append("s-1", [Credited(amount=2)], expected_version=NO_STREAM),
            store.append("s-2", [Credited(amount=3)] * 2),
            return_exceptions=True,
        )
        assert isinstance(results[0], ConcurrencyError)
        assert store.known_head() == await store.head() == 5
        # Another connection (as another process would) appends: the known head lags, never leads.
        await other.append("s-3", [Credited(amount=4)])
        assert store.known_head() == 5
        assert await store.wait_for_append(5, timeout=5) == 6  # noticed by the watcher's poll
        assert store.known_head() == 6
        # A live waiter is answered by the commit's own wake-up, with the committed head.
        waiter = asyncio.create_task(store.wait_for_append(6, timeout=10))
        await asyncio.sleep(0)
        result = await store.append("s-1", [Credited(amount=5)])
        assert await waiter == result.position == 7
        assert [e.position async for e in store.read_all(after=4)] == [5, 6, 7]


async def test_read_recent_serves_only_complete_runs_of_own_commits(tmp_path: Path) -> None:
    """A live subscriber takes just-appended events from memory; any position the store did not
    write itself (another process, a handler's append in a processing commit) sends it back to
    the database, so none is ever skipped."""
    from tidings.events import EventRegistry
    from tidings.testing import Debited

    url = f"sqlite:///{tmp_path}/r.db"
    async with open_store(url) as store, open_store(url) as other:
        await store.append("acct-1", [Credited(amount=1), Debited(amount=2)])
        await store.append("other-1", [Credited(amount=3)])
        recent = store.read_recent(0, 3)
        assert recent is not None
        assert [(e.position, e.stream_id, type(e.event)) for e in recent] == [
            (1, "acct-1", Credited),
            (2, "acct-1", Debited),
            (3, "other-1", Credited),
        ]
        assert recent == [e async for e in store.read_all()]  # the same envelopes as a read
        filtered = store.read_recent(0, 3, event_types=(Credited.__event_type__,), stream_prefix="acct-")
        assert filtered is not None and [e.position for e in filtered] == [1]
        assert store.read_recent(3, 4) is None  # not committed (as far as this store knows)
        await other.append("acct-2", [Credited(amount=4)])  # position 4, written elsewhere
        await store.append("acct-1", [Credited(amount=5)])  # position 5
        assert store.read_recent(3, 5) is None  # 4 is not in memory: read the database
        five = store.read_recent(4, 5)
        assert five is not None and [e.position for e in five] == [5]
        assert store.read_recent(0, 5) is None
        # Arbitrary SQL may rewrite stored events: what was kept is forgotten after it commits.
        await store.transaction(lambda tx: tx.execute("UPDATE tidings_events SET stream_id = stream_id"))
        assert store.read_recent(4, 5) is None
        await store.append("acct-1", [Credited(amount=6)])
        six = store.read_recent(5, 6)
        assert six is not None and [e.position for e in six] == [6]

    # Decoding goes through the store's registry, so upcasters still apply.
    registry = EventRegistry()

    class Renamed(Credited):
        __event_type__ = "test.Renamed"
        __event_version__ = 2
        __event_register__ = False

    registry.register(Renamed)
    registry.add_upcaster("test.Renamed", 1, lambda data: {**data, "amount": data["amount"] * 10})
    async with open_store(f"sqlite:///{tmp_path}/u.db", registry=registry) as store:
        request = store.prepare_append("s-1", [Renamed(amount=7)])
        old = request.events[0]._replace(schema_version=1)
        await store._append(dataclasses.replace(request, events=(old,)))
        [upcast] = store.read_recent(0, 1) or []
        assert upcast.event == Renamed(amount=70) and upcast.schema_version == 1
