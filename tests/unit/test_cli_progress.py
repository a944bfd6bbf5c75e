"""Long work shows progress on a terminal, and only there: ``tidings projections rebuild``."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

from tests.unit.test_cli_defects import TIMEOUT, invoke, seed, shop

__all__ = ["shop"]  # the fixture, used by name


def rebuild(cwd: Path, url: str, *, stderr_tty: bool) -> tuple[int, str, str]:
    """Run ``tidings projections rebuild`` with stderr on a pseudo-terminal or a pipe."""
    args = [sys.executable, "-m", "tidings.cli", "projections", "rebuild", "revenue", "--app", "shop:make"]
    env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(cwd), "TIDINGS_STORE": url}
    env.pop("NO_COLOR", None)
    if not stderr_tty:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
        return done.returncode, done.stdout, done.stderr
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=terminal, text=True)
        os.close(terminal)
        chunks: list[bytes] = []
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        out, _ = proc.communicate(timeout=TIMEOUT)
        return proc.returncode, out, b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(controller)


def test_rebuild_shows_progress_on_a_terminal_only(shop: Path) -> None:
    url = f"sqlite:///{shop}/progress.db"
    seed(url, *range(1, 400))
    code, out, err = rebuild(shop, url, stderr_tty=True)
    assert code == 0, err
    assert "rebuilding revenue" in err and "399/399 positions" in err  # updated as it replays
    assert "generation 2 is now serving" in out
    code, out, err = rebuild(shop, url, stderr_tty=False)
    assert code == 0, err
    assert "rebuilding" not in err and "positions" not in err
    assert "generation 3 is now serving" in out
    status = invoke("projections", "status", "--json", "--store", url)
    assert '"generation":3' in status.stdout.replace(" ", "")
