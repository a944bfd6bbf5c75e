"""Opening SQLite stores: bad URLs, foreign and read-only files, folders this user cannot enter.

A refused open changes nothing on disk. Permission cases run a small subprocess for which file
modes bind (see :func:`as_unprivileged`: as root, one without capabilities).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidings import (
    CorruptStore,
    InvalidArgument,
    Snapshot,
    StatementError,
    StoreError,
    open_store,
)
from tidings.testing import Credited, collect


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# -- URLs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite://x.db", "no host part; write sqlite:///x.db"),
        ("sqlite://localhost/x.db", "no host part"),
        ("sqlite:", "give the database file"),
        ("sqlite://", "give the database file"),
        ("sqlite:///", "give the database file"),
        ("sqlite:///:memory:", "memory://"),
        ("sqlite:///sub/", "names a directory"),
        ("sqlite:///x.db#frag", "fragment"),
        ("sqlite:///x.db?synchronus=normal", "'synchronus' (did you mean 'synchronous'?)"),
        ("sqlite:///x.db?synchronus=normal", "busy_timeout, mode, synchronous"),
        ("sqlite:///x.db?bogus=1&mode=ro", "unknown option 'bogus'"),
        ("sqlite:///x.db?synchronous", "malformed query string"),
        ("sqlite:///x.db?synchronous=", "synchronous must be 'full' or 'normal'"),
        ("sqlite:///x.db?synchronous=off", "synchronous must be 'full' or 'normal'"),
        ("sqlite:///x.db?busy_timeout=-1", "busy_timeout must be a whole number"),
        ("sqlite:///x.db?busy_timeout=1e3", "busy_timeout must be a whole number"),
        ("sqlite:///x.db?busy_timeout=99999999999", "busy_timeout must be a whole number"),
        ("sqlite:///x.db?mode=rwc", "mode must be 'rw' or 'ro'"),
        ("sqlite:///x%00.db", "NUL"),
        ("sqlit:///x.db", "unknown store URL scheme 'sqlit'"),
        ("x.db", "unknown store URL scheme ''"),
    ],
)
async def test_bad_urls_are_refused_and_create_nothing(
    url: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    before = listing(tmp_path)
    with pytest.raises(InvalidArgument) as info:
        await open_store(url).open()
    assert expected in str(info.value)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("where", ["folder", "file-parent"])
async def test_paths_that_cannot_be_a_database_file(tmp_path: Path, where: str) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "plain.txt").write_text("hello")
    path = tmp_path / "folder" if where == "folder" else tmp_path / "plain.txt" / "x.db"
    before = listing(tmp_path)
    with pytest.raises(InvalidArgument) as info:
        await open_store(f"sqlite:///{path}").open()
    assert str(path) in str(info.value)
    assert ("is a directory" if where == "folder" else "is a file, not a directory") in str(info.value)
    assert listing(tmp_path) == before


async def test_values_sqlite_cannot_hold_in_a_query(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path}/q.db") as store:
        with pytest.raises(InvalidArgument):
            await store.query("SELECT ?", (2**70,))
        with pytest.raises(InvalidArgument):
            await store.query("SELECT ?", ("\ud800",))
        assert await store.query("SELECT ?", (2**63 - 1,)) == [(2**63 - 1,)]


# -- foreign databases ------------------------------------------------------------------------------------


async def test_refused_foreign_database_is_left_exactly_as_it_was(tmp_path: Path) -> None:
    """A rollback-journal database of another application: refused before any switch to WAL."""
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada'), ('grace')")
    conn.commit()
    conn.close()
    before = listing(tmp_path)
    content = path.read_bytes()
    for url in (f"sqlite:///{path}", f"sqlite:///{path}?mode=ro"):
        with pytest.raises(CorruptStore) as info:
            await open_store(url).open()
        assert "not a tidings store" in str(info.value) and "app.db" in str(info.value)
    assert path.read_bytes() == content
    assert listing(tmp_path) == before  # same size and mtime; no -wal or -shm file
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
    assert conn.execute("SELECT name FROM users ORDER BY id").fetchall() == [("ada",), ("grace",)]
    conn.close()


async def test_empty_file_becomes_a_store_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    async with open_store(f"sqlite:///{path}") as store:
        await store.append("s", [Credited(amount=1)])
        assert await store.query("PRAGMA journal_mode") == [("wal",)]


# -- read-only stores ---------------------------------------------------------------------------------------


async def make_store(path: Path) -> None:
    async with open_store(f"sqlite:///{path}") as store:
        await store.append("s", [Credited(amount=1), Credited(amount=2)])
        await store.set_checkpoint("g", 1)


async def test_mode_ro_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    await make_store(path)
    content = path.read_bytes()
    async with open_store(f"sqlite:///{path}?mode=ro") as store:
        assert [e.event async for e in store.read_stream("s")] == [Credited(amount=1), Credited(amount=2)]
        assert await store.head() == 2 and await store.load_checkpoint("g") == 1
        assert await store.query("SELECT count(*) FROM tidings_events") == [(2,)]
        writes = [
            lambda: store.append("s", [Credited(amount=3)]),
            lambda: store.save_snapshot(Snapshot("s", 2, "A", "h", b"{}")),
            lambda: store.set_checkpoint("g", 2),
            lambda: store.transaction(lambda tx: tx.execute("DELETE FROM tidings_events")),
        ]
        for write in writes:
            with pytest.raises(StatementError, match="read-only"):
                await write()
        assert len(await collect(store.read_all())) == 2
    assert path.read_bytes() == content


async def test_mode_ro_never_creates_a_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        await open_store(f"sqlite:///{tmp_path}/missing.db?mode=ro").open()
    assert listing(tmp_path) == {}


# -- as a user without the permissions ----------------------------------------------------------------------

_PROBE = """
import asyncio, json, sys
from tidings import open_store
from tidings.testing import Credited

async def main(url):
    out = {}
    try:
        async with open_store(url) as store:
            out["events"] = [e.version async for e in store.read_stream("s")]
            try:
                await store.append("s", [Credited(amount=3)])
                out["append"] = "ok"
            except Exception as exc:
                out["append"] = [type(exc).__name__, str(exc)]
    except Exception as exc:
        out["open"] = [type(exc).__name__, str(exc)]
    print(json.dumps(out))

asyncio.run(main(sys.argv[1]))
"""


def as_unprivileged(url: str) -> dict[str, object]:
    """Open ``url`` in a subprocess for which file modes bind; return what it saw.

    As root, the subprocess stays root but without any capability (``setpriv`` clears the bounding
    and inheritable sets, so none are regained on exec): it can no longer override file modes, so
    a 0o444 file or a 0o555 folder is read-only and a 0o000 folder cannot be entered, exactly as for
    an ordinary user -- and it can still run this interpreter from a private (0o700) checkout,
    which ``nobody`` could not. Otherwise the subprocess runs as the current user.
    """
    command = [sys.executable, "-c", _PROBE, url]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "setpriv (util-linux) is needed to test permissions as root"
        command = [setpriv, "--bounding-set=-all", "--inh-caps=-all", *command]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.fixture
def restore_modes(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path``, with every mode set back afterwards so that pytest can remove it."""
    yield tmp_path
    for path in [tmp_path, *tmp_path.rglob("*")]:
        with contextlib.suppress(OSError):
            path.chmod(0o755 if path.is_dir() else 0o644)


def test_the_probe_really_lacks_the_rights(restore_modes: Path) -> None:
    """The fault is real: the subprocess cannot enter a 0o000 folder even as root."""
    locked = restore_modes / "locked"
    locked.mkdir()
    locked.chmod(0o000)
    seen = as_unprivileged(f"sqlite:///{locked}/x.db")
    assert seen["open"][0] == "StatementError"  # type: ignore[index]
    locked.chmod(0o755)
    assert list(locked.iterdir()) == []


async def test_read_only_file_is_reported_read_only_not_corrupt(restore_modes: Path) -> None:
    folder = restore_modes / "store"
    folder.mkdir()
    path = folder / "events.db"
    await make_store(path)
    path.chmod(0o444)  # the folder stays writable: SQLite can add the -wal/-shm files it reads with
    content = path.read_bytes()
    seen = as_unprivileged(f"sqlite:///{path}")
    assert seen["open"][0] == "StatementError"  # type: ignore[index]
    assert "read-only" in seen["open"][1] and "mode=ro" in seen["open"][1]  # type: ignore[index]
    seen = as_unprivileged(f"sqlite:///{path}?mode=ro")
    assert seen["events"] == [1, 2]
    assert seen["append"][0] == "StatementError" and "read-only" in seen["append"][1]  # type: ignore[index]
    assert path.read_bytes() == content


async def test_read_only_folder_is_reported_read_only_not_corrupt(restore_modes: Path) -> None:
    folder = restore_modes / "store"
    folder.mkdir()
    path = folder / "events.db"
    await make_store(path)
    path.chmod(0o444)
    folder.chmod(0o555)
    before = listing(folder)
    for url in (f"sqlite:///{path}", f"sqlite:///{path}?mode=ro", f"sqlite:///{folder}/new.db"):
        seen = as_unprivileged(url)
        kind, message = seen["open"]  # type: ignore[misc]
        assert kind == "StatementError", seen
        assert str(folder) in message
        assert "corrupt" not in message and "not a tidings store" not in message
    assert listing(folder) == before


async def test_folder_that_cannot_be_entered(restore_modes: Path) -> None:
    private = restore_modes / "private"
    (private / "sub").mkdir(parents=True)
    private.chmod(0o000)
    for path in (private / "x.db", private / "sub" / "x.db"):
        seen = as_unprivileged(f"sqlite:///{path}")
        kind, message = seen["open"]  # type: ignore[misc]
        assert kind == "StatementError", seen
        assert "permission denied" in message and str(path) in message
    private.chmod(0o755)
    assert [p.name for p in private.iterdir()] == ["sub"]
    assert list((private / "sub").iterdir()) == []
