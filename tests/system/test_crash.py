"""Kill the processing service with SIGKILL at random moments; effects must happen exactly once."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import sys
from pathlib import Path

from tidings import open_store

WORKER = Path(__file__).with_name("crash_worker.py")
EVENTS = 4000


async def start(url: str, effects: Path, redeliver: bool) -> asyncio.subprocess.Process:
    args = [sys.executable, str(WORKER), url, str(effects)] + (["--redeliver"] if redeliver else [])
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert line.strip() == b"ready", line
    return proc


async def test_sigkill_loses_nothing_and_applies_nothing_twice(tmp_path: Path) -> None:
    sys.path.insert(0, str(WORKER.parent))
    from crash_worker import Deposited  # the worker's event classes

    url = f"sqlite:///{tmp_path}/crash.db"
    effects = tmp_path / "effects.db"
    rng = random.Random(7)
    async with open_store(url) as store:
        for i in range(0, EVENTS, 50):
            await store.append(f"acc-{i % 7}", [Deposited(amount=1)] * 50)
        head = await store.head()
        mid_work_kills = 0
        groups = ("crash.audit", "crash.external")
        for round_ in range(6):
            redeliver = round_ % 2 == 1  # the worker rewinds the groups to 0 before "ready"
            before = {} if redeliver else await store.checkpoints()
            proc = await start(url, effects, redeliver=redeliver)
            await asyncio.sleep(rng.uniform(0.02, 0.4))  # a random moment to kill at: the scenario
            proc.send_signal(signal.SIGKILL)
            # It died by the signal (it never exits by itself before its work is done).
            assert await proc.wait() == -signal.SIGKILL
            checkpoints = await store.checkpoints()
            # Mid-work: a group had made progress in this round, and had more to do.
            mid_work = [g for g in groups if before.get(g, 0) < checkpoints.get(g, 0) < head]
            mid_work_kills += bool(mid_work)
        # The faults must really have hit work in progress, or the test proves nothing.
        assert mid_work_kills >= 2, f"only {mid_work_kills} of 6 kills hit a group mid-work"
        # A last run, to completion, with every event delivered again.
        proc = await start(url, effects, redeliver=True)
        for group in ("crash.audit", "crash.external"):
            assert await store.wait_for(head, group=group, timeout=60), group
        # The projection's checkpoint sits at the head too (filtered events count as processed).
        assert await store.wait_for(head, group="projection:totals:g1", timeout=60)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop, exit code 0
        assert await asyncio.wait_for(proc.wait(), 30) == 0

        totals = dict(await store.query("SELECT account, n FROM totals"))
        per_account = {f"acc-{k}": 0 for k in range(7)}
        for i in range(0, EVENTS, 50):
            per_account[f"acc-{i % 7}"] += 50
        assert totals == per_account  # every deposit counted exactly once
        audited = [e async for e in store.read_all(event_types=["crash.Audited"])]
        sources = [e.event.source for e in audited]  # type: ignore[union-attr]
        assert len(sources) == EVENTS and len(set(sources)) == EVENTS
        deposits = {str(e.event_id) async for e in store.read_all(event_types=["crash.Deposited"])}
        assert set(sources) == deposits
    with sqlite3.connect(effects) as db:
        rows = [r[0] for r in db.execute("SELECT event_id FROM effects")]
    assert len(rows) == EVENTS and set(rows) == deposits  # the external effect, exactly once
