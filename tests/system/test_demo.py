"""``tidings demo``: the bank walk-through, run through the CLI and as a real process."""

from __future__ import annotations

import asyncio
import io
import os
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from tidings import Repository, open_store
from tidings.cli import app
from tidings.demo.bank import ACCOUNT_ID, Account, BankSummary, run_demo

BIN = Path(sys.executable).parent / "tidings"
TIMEOUT = 60.0
EVENT_TYPES = [
    "bank.AccountOpened",
    "bank.MoneyDeposited",
    "bank.MoneyWithdrawn",
    "bank.MoneyWithdrawn",
    "bank.MoneyWithdrawn",
    *["bank.MoneyDeposited"] * 5,
    "bank.MoneyWithdrawn",
]
CONFLICT = f"stream {ACCOUNT_ID!r}: expected version 3, but the stream is at version 4"


def assert_narrated(output: str) -> None:
    assert "final balance 35 at version 11" in output
    assert f"ConcurrencyError: {CONFLICT}" in output
    assert "cannot pay 500: the balance is only 70" in output
    assert "as of version 2: version 2, balance 100" in output
    assert "(when version 3 was stored): version 3, balance 70" in output
    assert "snapshot stored at version 10" in output
    assert "snapshot at version 10 + 1 event replayed" in output


async def _read_back(url: str) -> tuple[list[str], int | None, int]:
    async with open_store(url) as store:
        types = [e.event_type async for e in store.read_stream(ACCOUNT_ID)]
        snapshot = await store.load_snapshot(ACCOUNT_ID)
        account = await Repository(store, Account).get(ACCOUNT_ID)
        return types, None if snapshot is None else snapshot.version, account.balance


def assert_stored(url: str) -> None:
    types, snapshot_version, balance = asyncio.run(_read_back(url))
    assert types == EVENT_TYPES
    assert snapshot_version == 10
    assert balance == 35


def test_demo_through_the_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    result = CliRunner().invoke(app, ["tour", "--store", url], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert_narrated(result.stdout)
    assert f"tidings events {ACCOUNT_ID} --store {url}" in result.stdout
    assert_stored(url)


def test_demo_refuses_a_store_that_already_has_the_account(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    assert CliRunner().invoke(app, ["tour", "--store", url]).exit_code == 0
    result = CliRunner().invoke(app, ["tour", "--store", url])
    assert result.exit_code == 1
    assert "already holds stream 'account-1'" in result.stderr
    assert_stored(url)  # unchanged by the refused second run


def test_demo_as_a_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/demo.db"
    out = subprocess.run(
        [str(BIN), "tour", "--store", url],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert_narrated(out.stdout)
    assert_stored(url)


def test_demo_defaults_to_a_new_file_in_the_temp_dir(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN), "tour"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path)},
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    (database,) = tmp_path.glob("tidings-demo-*/bank.db")
    assert f"--store sqlite:///{database}" in out.stdout
    assert not (tmp_path / "tidings.db").exists()
    assert_stored(f"sqlite:///{database}")


async def test_run_demo_is_deterministic_apart_from_timestamps() -> None:
    outputs: list[str] = []
    summaries: list[BankSummary] = []
    for _ in range(2):
        buffer = io.StringIO()
        summaries.append(await run_demo("memory://", Console(file=buffer, width=120)))
        outputs.append(re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+\+00:00", "<time>", buffer.getvalue()))
    assert outputs[0] == outputs[1]
    assert (
        summaries[0]
        == summaries[1]
        == BankSummary(
            store_url="memory://",
            account_id=ACCOUNT_ID,
            owner="Ada",
            balance=35,
            version=11,
            events=11,
            refused=f"account {ACCOUNT_ID!r} cannot pay 500: the balance is only 70",
            conflict=CONFLICT,
            snapshot_version=10,
            replayed_after_snapshot=1,
        )
    )
