"""Was the machine quiet? CPU time used during a run by processes other than the benchmark's own.

The load average cannot tell: the benchmark itself keeps both cores of a small machine busy (its
writer and reader threads, its PostgreSQL server). Instead :class:`CpuAccount` reads the machine's
busy CPU time from ``/proc/stat`` at the start and at the end of the run and subtracts what this
process (all its threads, and the children it waited for) and the servers it started (PostgreSQL's
postmaster, its live backends and the backends it reaped; nats-server) and the kernel's own threads (which do
the write-back and journalling of what the benchmark fsyncs) used in between. What remains was
used by other work -- another test suite, a compiler -- and skews the figures by competing for the
CPUs.

Linux only; elsewhere the account is ``None`` and the report says nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path


def _ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all CPUs), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    # cpu  user nice system idle iowait irq softirq steal guest guest_nice
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / _ticks_per_second()


def _process_cpu(pid: int, *, reaped_children: bool) -> float:
    """utime + stime (+ cutime + cstime) of ``pid`` in seconds; 0 if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw.rsplit(")", 1)[1].split()  # the command name may contain spaces
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    total = utime + stime + (cutime + cstime if reaped_children else 0)
    return total / _ticks_per_second()


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def _kernel_threads() -> dict[int, float]:
    """CPU seconds of every kernel thread (children of kthreadd, pid 2), by pid.

    The kernel writes back and journals the files the benchmark fsyncs in threads of its own
    (``kworker``, ``jbd2``): that time is the benchmark's doing, not another process's.
    """
    return {pid: _process_cpu(pid, reaped_children=False) for pid in [2, *_children(2)]}


def server_cpu(postmaster: int) -> float:
    """CPU seconds of a PostgreSQL server: the postmaster, reaped backends, and live ones."""
    return _process_cpu(postmaster, reaped_children=True) + sum(
        _process_cpu(child, reaped_children=True) for child in _children(postmaster)
    )


@dataclasses.dataclass(slots=True)
class CpuAccount:
    """Start with :meth:`start`; :meth:`others` gives the CPU seconds other processes used since."""

    machine: float
    own: float
    server_pids: Callable[[], list[int]]
    kernel: dict[int, float]
    kernel_used: float = 0.0

    @classmethod
    def start(cls, server_pids: Callable[[], list[int]]) -> CpuAccount | None:
        machine = _machine_busy()
        if machine is None:
            return None
        own = _process_cpu(os.getpid(), reaped_children=True)
        return cls(machine, own, server_pids, _kernel_threads())

    def others(self) -> float:
        """CPU seconds used since :meth:`start` by processes that are not this benchmark's.

        Call while the benchmark's servers (PostgreSQL, nats-server) still run: a stopped server's
        CPU time can no longer be read and would count as someone else's.
        """
        machine = _machine_busy() or self.machine
        own = _process_cpu(os.getpid(), reaped_children=True)
        server = sum(server_cpu(pid) for pid in self.server_pids())
        kernel = _kernel_threads()
        self.kernel_used = sum(max(0.0, cpu - self.kernel.get(k, 0.0)) for k, cpu in kernel.items())
        return max(0.0, (machine - self.machine) - (own - self.own) - server - self.kernel_used)
