"""What every subscription group of a store is doing, as data (rendered by ``tidings groups``).

The status is read from the database, so it tells the truth about runners in every process: a
group is ``live`` or ``catching up`` only while a runner holds its lease (see
:mod:`tidings.processing.leases`), and ``stopped`` when none does (no lease, or one that expired:
its holder died or was stopped).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from datetime import datetime
from typing import Literal

from tidings.processing.leases import LeaseRecord, read_leases
from tidings.store.tracking import SQLStore, TrackingStore

__all__ = ["GroupState", "GroupStatus", "group_status"]

GroupState = Literal["live", "catching up", "failed", "stopped", "rebuilding"]


@dataclasses.dataclass(frozen=True, slots=True)
class GroupStatus:
    """One subscription group: how far it got, who runs it, and in what state.

    ``state`` is ``"live"`` (a runner holds the lease and the group is at the head),
    ``"catching up"`` (a runner holds it, lag > 0), ``"failed"`` (the runner reports an error it
    cannot get past, see ``last_error``), ``"stopped"`` (no runner holds the lease), or
    ``"rebuilding"`` (a projection generation being built by a rebuild). ``holder`` is
    ``"host:pid"`` of the lease's current or last holder, ``heartbeat_at`` its last heartbeat.
    """

    group: str
    checkpoint: int
    head: int
    lag: int
    state: GroupState
    holder: str | None
    host: str | None
    pid: int | None
    heartbeat_at: datetime | None
    last_error: str | None
    dead_letters: int


def _state(lease: LeaseRecord | None, lag: int) -> GroupState:
    if lease is None or not lease.alive:
        return "stopped"
    if lease.state == "failed":
        return "failed"
    return "live" if lag == 0 else "catching up"


async def group_status(store: TrackingStore) -> list[GroupStatus]:
    """The status of every group known to ``store``'s database, sorted by name.

    A projection's group is named ``projection:NAME:gN`` after its generation; its lease is
    ``projection:NAME``, shared by its generations.
    """
    checkpoints = await store.checkpoints()
    head = await store.head()
    leases = await read_leases(store)
    projections: dict[str, tuple[int, int | None]] = {}
    if not isinstance(store, SQLStore):
        dead = Counter(d.group for d in await store.dead_letters())
    else:
        # Counted by the database: dead letters carry tracebacks, not worth loading to count.
        counted = await store.query(
            "SELECT group_name, count(*) FROM tidings_dead_letters GROUP BY group_name"
        )
        dead = Counter({str(group): int(n) for group, n in counted})
        rows = await store.query("SELECT name, generation, building FROM tidings_projections")
        projections = {str(n): (int(g), None if b is None else int(b)) for n, g, b in rows}
    groups = set(checkpoints) | {f"projection:{n}:g{g}" for n, (g, _) in projections.items()}
    groups |= {name for name in leases if not name.startswith("projection:")}
    out = []
    for group in sorted(groups):
        checkpoint = checkpoints.get(group, 0)
        lag = max(0, head - checkpoint)
        lease_name = group
        active = True
        building = False
        if group.startswith("projection:"):
            lease_name, _, generation = group.rpartition(":")
            name = lease_name.removeprefix("projection:")
            current, rebuilding = projections.get(name, (None, None))
            active = generation == f"g{current}"
            building = generation == f"g{rebuilding}"
        lease = leases.get(lease_name) if active else None
        state: GroupState = "rebuilding" if building else _state(lease, lag)
        out.append(
            GroupStatus(
                group,
                checkpoint,
                head,
                lag,
                state,
                None if lease is None else str(lease.holder),
                None if lease is None else lease.holder.host,
                None if lease is None else lease.holder.pid,
                None if lease is None else lease.heartbeat_at,
                None if lease is None else lease.last_error,
                dead[group],
            )
        )
    return out
