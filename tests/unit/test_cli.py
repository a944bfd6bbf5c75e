"""The ``tidings`` command against real SQLite files: tables, JSON lines, errors, ``--follow``."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import pytest
from typer.testing import CliRunner, Result

import tidings
from tidings import Event, EventRegistry, open_store
from tidings.cli import app

BIN = Path(sys.executable).parent / "tidings"
TIMEOUT = 30.0


class Opened(Event):
    __event_type__ = "test_cli.Opened"
    owner: str


class Deposited(Event):
    __event_type__ = "test_cli.Deposited"
    amount: int


class Ghost(Event):
    """Written through a private registry, so the CLI (default registry) does not know the type."""

    __event_type__ = "test_cli.Ghost"
    __event_register__ = False
    x: int


def invoke(*args: str, env: Mapping[str, str | None] | None = None) -> Result:
    # A wide terminal keeps table rows on one line; TIDINGS_STORE must not leak in from outside.
    base: dict[str, str | None] = {"COLUMNS": "200", "TIDINGS_STORE": None}
    return CliRunner().invoke(app, list(args), env={**base, **(env or {})})


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def rows(text: str) -> list[list[str]]:
    """The table's lines, split into cells on whitespace."""
    return [line.split() for line in text.splitlines() if line.strip()]


async def _append(url: str, stream: str, events: list[Event], registry: EventRegistry | None = None) -> None:
    async with open_store(url, registry=registry) as store:
        await store.append(stream, events)


def append(url: str, stream: str, *events: Event) -> None:
    asyncio.run(_append(url, stream, list(events)))


def append_ghost(url: str, stream: str, x: int) -> None:
    registry = EventRegistry()
    registry.register(Ghost)
    asyncio.run(_append(url, stream, [Ghost(x=x)], registry))


@pytest.fixture
def url(tmp_path: Path) -> str:
    """A store with positions 1..5: acct-1 at version 3, acct-2 at 1, other-9 (unknown type) at 1."""
    url = f"sqlite:///{tmp_path}/events.db"
    append(url, "acct-1", Opened(owner="ann"), Deposited(amount=5))
    append(url, "acct-2", Opened(owner="bob"))
    append(url, "acct-1", Deposited(amount=7))
    append_ghost(url, "other-9", 1)
    return url


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"tidings {tidings.__version__}"


def test_python_m_tidings_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tidings.cli", "--version"], capture_output=True, text=True, timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"tidings {tidings.__version__}"


def test_streams_table(url: str) -> None:
    result = invoke("streams", "--store", url)
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    assert ["acct-1", "3", "4"] in table
    assert ["acct-2", "1", "3"] in table
    assert ["other-9", "1", "5"] in table
    assert "3 streams" in result.stdout


def test_streams_json_and_prefix(url: str) -> None:
    result = invoke("streams", "--store", url, "--json")
    assert result.exit_code == 0, result.output
    assert json_lines(result.stdout) == [
        {"stream_id": "acct-1", "version": 3, "position": 4},
        {"stream_id": "acct-2", "version": 1, "position": 3},
        {"stream_id": "other-9", "version": 1, "position": 5},
    ]
    result = invoke("streams", "--store", url, "--json", "--prefix", "acct-")
    assert [s["stream_id"] for s in json_lines(result.stdout)] == ["acct-1", "acct-2"]


def test_store_from_environment(url: str) -> None:
    result = invoke("streams", "--json", env={"TIDINGS_STORE": url})
    assert result.exit_code == 0, result.output
    assert len(json_lines(result.stdout)) == 3


def test_events_of_a_stream_table(url: str) -> None:
    result = invoke("events", "acct-1", "--store", url)
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    # Position, stream, version, type, date, time, data.
    cells = [(r[0], r[1], r[2], r[3], r[-1]) for r in table if r[0].isdigit()]
    assert cells == [
        ("1", "acct-1", "1", "test_cli.Opened", '{"owner":"ann"}'),
        ("2", "acct-1", "2", "test_cli.Deposited", '{"amount":5}'),
        ("4", "acct-1", "3", "test_cli.Deposited", '{"amount":7}'),
    ]
    assert "acct-2" not in result.stdout


def test_events_of_a_stream_json(url: str) -> None:
    result = invoke("events", "acct-1", "--store", url, "--json")
    assert result.exit_code == 0, result.output
    events = json_lines(result.stdout)
    assert [(e["position"], e["version"]) for e in events] == [(1, 1), (2, 2), (4, 3)]
    assert [e["data"] for e in events] == [{"owner": "ann"}, {"amount": 5}, {"amount": 7}]
    first = events[0]
    assert first["stream_id"] == "acct-1"
    assert first["event_type"] == "test_cli.Opened"
    assert first["schema_version"] == 1
    assert set(first["metadata"]) == {"traceparent"}  # trace context on every event
    assert first["timestamp"].endswith("+00:00")
    # --after is a version for one stream.
    result = invoke("events", "acct-1", "--store", url, "--json", "--after", "2")
    assert [e["version"] for e in json_lines(result.stdout)] == [3]


def test_events_all_after_and_types(url: str) -> None:
    result = invoke("events", "--all", "--store", url, "--json")
    assert [e["position"] for e in json_lines(result.stdout)] == [1, 2, 3, 4, 5]
    result = invoke("events", "--all", "--store", url, "--json", "--after", "2")
    assert [e["position"] for e in json_lines(result.stdout)] == [3, 4, 5]
    result = invoke("events", "--all", "--store", url, "--json", "--type", "test_cli.Deposited")
    assert [e["position"] for e in json_lines(result.stdout)] == [2, 4]
    result = invoke(
        "events", "--all", "--store", url, "--json", "-t", "test_cli.Opened", "-t", "test_cli.Ghost"
    )
    assert [e["position"] for e in json_lines(result.stdout)] == [1, 3, 5]
    result = invoke("events", "acct-1", "--store", url, "--json", "--type", "test_cli.Opened")
    assert [e["position"] for e in json_lines(result.stdout)] == [1]


def test_unknown_event_type_is_printed_raw(url: str) -> None:
    result = invoke("events", "--all", "--store", url, "--json", "--after", "4")
    assert result.exit_code == 0, result.output
    (ghost,) = json_lines(result.stdout)
    assert ghost["event_type"] == "test_cli.Ghost"
    assert ghost["data"] == {"x": 1}
    result = invoke("events", "other-9", "--store", url)
    assert result.exit_code == 0, result.output
    assert rows(result.stdout)[-1][:4] == ["5", "other-9", "1", "test_cli.Ghost"]
    assert '{"x":1}' in result.stdout


def test_empty_results(tmp_path: Path, url: str) -> None:
    result = invoke("events", "nobody", "--store", url)
    assert result.exit_code == 0
    assert "Stream nobody: no events" in result.stdout
    result = invoke("events", "nobody", "--store", url, "--json")
    assert result.exit_code == 0
    assert result.stdout == ""
    result = invoke("streams", "--store", url, "--prefix", "zzz")
    assert result.exit_code == 0
    assert "no streams" in result.stdout


@pytest.mark.parametrize("command", [["streams"], ["events", "--all"], ["events", "acct-1", "--json"]])
def test_missing_database_is_an_error_and_not_created(tmp_path: Path, command: list[str]) -> None:
    path = tmp_path / "missing.db"
    result = invoke(*command, "--store", f"sqlite:///{path}")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "does not exist" in result.stderr
    assert str(path) in result.stderr
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_default_store_is_tidings_db_and_not_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("streams")
    assert result.exit_code == 1
    assert "sqlite:///tidings.db" in result.stderr
    assert "TIDINGS_STORE" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_tidings_errors_are_one_red_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database " * 100)
    for store in ["bogus://x", "sqlite:///", f"sqlite:///{junk}"]:
        result = invoke("events", "--all", "--store", store)
        assert result.exit_code == 1, (store, result.output)
        assert result.stdout == ""
        assert result.stderr.startswith("error: ")
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output
    assert junk.read_bytes() == b"not a database " * 100


@pytest.mark.parametrize(
    "args",
    [
        ["events"],
        ["events", "acct-1", "--all"],
        ["events", "acct-1", "--follow"],
        ["events", "--all", "--after", "-1"],
    ],
)
def test_usage_errors(url: str, args: list[str]) -> None:
    result = invoke(*args, "--store", url)
    assert result.exit_code == 2, result.output


class LineReader:
    """Reads a pipe on a thread, so a test can wait for a line with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)

    def next(self) -> str:
        return self._lines.get(timeout=TIMEOUT)

    def join(self) -> None:
        self._thread.join(TIMEOUT)


def _sigint_default() -> None:
    # Ctrl-C in a terminal: the child must not inherit an ignored SIGINT (as under `cmd &`).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_follow_prints_new_events_until_sigint(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/events.db"
    append(url, "acct-1", Opened(owner="ann"), Deposited(amount=5))
    append(url, "acct-2", Opened(owner="bob"))
    command = [str(BIN), "events", "--all", "--follow", "--json", "--after", "1", "--store", url]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=_sigint_default,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            reader = LineReader(proc.stdout)
            seen = [json.loads(reader.next()) for _ in range(2)]
            assert [(e["position"], e["stream_id"]) for e in seen] == [(2, "acct-1"), (3, "acct-2")]
            # Appended by this (another) process while the command waits.
            append(url, "acct-3", Opened(owner="cy"))
            append_ghost(url, "other-9", 2)
            append(url, "acct-1", Deposited(amount=9))
            seen = [json.loads(reader.next()) for _ in range(3)]
            assert [(e["position"], e["version"], e["event_type"]) for e in seen] == [
                (4, 1, "test_cli.Opened"),
                (5, 1, "test_cli.Ghost"),
                (6, 3, "test_cli.Deposited"),
            ]
            assert seen[1]["data"] == {"x": 2}
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=TIMEOUT) == 0
            reader.join()
            assert proc.stderr.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()


def test_follow_with_type_filter(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/events.db"
    append(url, "acct-1", Opened(owner="ann"), Deposited(amount=5))
    command = [str(BIN), "events", "--all", "-f", "--json", "--type", "test_cli.Deposited", "--store", url]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stderr is not None
            reader = LineReader(proc.stdout)
            assert json.loads(reader.next())["position"] == 2
            append(url, "acct-2", Opened(owner="bob"), Opened(owner="eve"))
            append(url, "acct-2", Deposited(amount=1))
            assert json.loads(reader.next())["position"] == 5
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=TIMEOUT) == 0
            reader.join()
            assert proc.stderr.read() == ""
        finally:
            if proc.poll() is None:
                proc.kill()


def test_loading_the_cli_registers_no_demo_event_classes() -> None:
    """The demo's event classes join the registry only when the demo runs, never for other
    commands (an app's own 'OrderPlaced' must not collide with the demo's)."""
    import subprocess
    import sys

    code = (
        "import tidings.cli.main, tidings.events as e;"
        "print(sorted(t for t in e.default_registry.types() if t.startswith(('shop.', 'bank.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
