"""``tidings serve``: the command runs the console with uvicorn; its options and its failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.web.world import Seeded
from tidings.cli.main import app
from tidings.cli.trace import parse_sources
from tidings.errors import InvalidArgument
from tidings.testing.servers import free_port

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


def test_store_options_name_the_sources() -> None:
    """As for ``tidings trace``: NAME=URL, or a bare URL named after its file or schema."""
    assert parse_sources(["sqlite:///a.db"]) == {"a": "sqlite:///a.db"}
    assert parse_sources(["orders=sqlite:///o.db", "postgresql://u@h/db?schema=billing"]) == {
        "orders": "sqlite:///o.db",
        "billing": "postgresql://u@h/db?schema=billing",
    }
    with pytest.raises(InvalidArgument, match="given twice"):
        parse_sources(["a=sqlite:///1.db", "a=sqlite:///2.db"])


def test_a_missing_store_file_is_refused_and_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.db"
    result = CliRunner().invoke(app, ["serve", "--store", f"sqlite:///{missing}"])
    assert result.exit_code == 1
    assert "does not exist" in result.output
    assert not missing.exists()


def test_without_the_web_extra_serve_names_the_fix(tmp_path: Path) -> None:
    blocked = (
        "import sys; sys.modules['fastapi'] = None; "  # as if the extra were not installed
        "from tidings.cli.main import main; "
        f"sys.argv = ['tidings', 'serve', '--store', 'sqlite:///{tmp_path}/x.db']; main()"
    )
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "pip install 'tidings[web]'" in " ".join(done.stderr.split())


def test_serve_runs_the_console_until_interrupted(sqlite_seeded: tuple[str, Seeded], tmp_path: Path) -> None:
    url, seeded = sqlite_seeded
    port = free_port()
    env = {**os.environ, "TIDINGS_CONSOLE_TOKEN": "tok"}
    command = [sys.executable, "-m", "tidings.cli", "serve", "--store", url, "--port", str(port)]
    command += ["--app", "tests.web.console_app:service"]  # its handler retries the dead letter
    process = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        base = f"http://127.0.0.1:{port}"
        info = None
        deadline = time.monotonic() + 60
        while info is None and time.monotonic() < deadline and process.poll() is None:
            try:
                info = httpx.get(f"{base}/api/info", timeout=5).json()
            except httpx.TransportError:
                time.sleep(0.1)
        assert info is not None, process.communicate(timeout=10)
        assert info["head"] == seeded.head and info["actions_enabled"] and info["sources"] == ["console"]
        assert info["service"] == "billing"
        assert httpx.get(f"{base}/streams", timeout=5).status_code == 200
        refused = httpx.post(f"{base}/api/dead-letters/{seeded.dead_letter}/retry", timeout=5)
        assert refused.status_code == 401
        done = httpx.post(
            f"{base}/api/dead-letters/{seeded.dead_letter}/retry",
            headers={"Authorization": "Bearer tok"},
            timeout=30,
        )
        assert done.json()["outcome"] == "processed"
        receipts = httpx.get(f"{base}/api/streams/receipt-2", timeout=5).json()
        assert [e["event_type"] for e in receipts["events"]] == ["webtest.ReceiptSent"]
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert f"http://127.0.0.1:{port}/" in err and "actions enabled" in err


def test_stopping_ends_the_live_tails_cleanly(sqlite_seeded: tuple[str, Seeded]) -> None:
    """Ctrl-C with live tails open: each tail's response ends properly (a browser reconnects
    later and resumes), nothing is cancelled mid-response, no traceback, exit 0."""
    import threading

    url, _ = sqlite_seeded
    port = free_port()
    command = [sys.executable, "-m", "tidings.cli", "serve", "--store", url, "--port", str(port)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    outcomes: list[str] = []
    opened = threading.Semaphore(0)

    def follow() -> None:
        try:
            with httpx.stream("GET", f"{base}/api/tail", timeout=60) as response:
                opened.release()
                for _ in response.iter_lines():
                    pass
            outcomes.append("ended")
        except httpx.HTTPError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")

    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            try:
                httpx.get(f"{base}/api/info", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        followers = [threading.Thread(target=follow) for _ in range(2)]
        for each in followers:
            each.start()
        for _ in followers:
            assert opened.acquire(timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    for each in followers:
        each.join(timeout=30)
    assert outcomes == ["ended", "ended"]
    assert process.returncode == 0 and "Traceback" not in err and "Cancel" not in err, err
    assert "tidings console stopped" in err


def test_a_store_that_does_not_answer_is_one_error_line_and_exit_1() -> None:
    """A PostgreSQL URL where nothing listens: 'error: ...' naming the store, exit 1 (as every
    command), no traceback, and no banner claiming the console is up."""
    port = free_port()
    url = f"postgresql://nobody@127.0.0.1:{free_port()}/db"
    command = [sys.executable, "-m", "tidings.cli", "serve", "--store", url, "--port", str(port)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "error: cannot connect to PostgreSQL" in done.stderr and "Traceback" not in done.stderr
    assert "tidings console on" not in done.stderr


def test_a_port_in_use_is_one_error_line_and_exit_1(sqlite_seeded: tuple[str, Seeded]) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "tidings.cli", "serve", "--store", sqlite_seeded[0]]
        done = subprocess.run(
            [*command, "--port", str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
    assert done.returncode == 1, done.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
    assert "tidings console on" not in done.stderr
