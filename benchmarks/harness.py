"""What every scenario shares: sizes, fresh databases, timing and the shape of a result."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal


@dataclasses.dataclass(frozen=True, slots=True)
class Sizes:
    """How much work each scenario does. :data:`FULL` is what ``make bench`` runs."""

    events_per_aggregate: int
    sequential_saves: int
    concurrent_writers: int
    saves_per_writer: int
    bulk_events: int
    load_events: int
    read_all_events: int
    memory_events: int
    memory_append_size: int
    projection_events: int
    projection_peer_events: int
    latency_appends: int
    latency_warmup: int
    pg_writers: int
    pg_saves_per_writer: int
    pg_read_all_events: int
    pg_bulk_events: int
    bus_events: int
    bus_latency_events: int
    bus_scale_events: int
    bus_repeats: int
    repeats: int


FULL: Sizes = Sizes(
    events_per_aggregate=10,
    sequential_saves=2_000,
    concurrent_writers=16,
    saves_per_writer=150,
    bulk_events=10_000,
    load_events=10_000,
    read_all_events=100_000,
    memory_events=1_000_000,
    memory_append_size=10_000,
    projection_events=100_000,
    projection_peer_events=20_000,
    latency_appends=1_000,
    latency_warmup=100,
    pg_writers=8,
    pg_saves_per_writer=150,
    pg_read_all_events=100_000,
    pg_bulk_events=10_000,
    bus_events=3_000,
    bus_latency_events=400,
    bus_scale_events=2_000,
    bus_repeats=3,
    repeats=5,
)

QUICK: Sizes = dataclasses.replace(
    FULL,
    sequential_saves=300,
    saves_per_writer=25,
    read_all_events=20_000,
    memory_events=200_000,
    projection_events=20_000,
    projection_peer_events=5_000,
    latency_appends=300,
    latency_warmup=50,
    pg_saves_per_writer=40,
    pg_read_all_events=20_000,
    bus_events=1_000,
    bus_latency_events=200,
    bus_scale_events=800,
    bus_repeats=1,
    repeats=3,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Aim:
    """The target a ratio is held to: ``ratio >= threshold`` or ``ratio <= threshold``."""

    op: Literal[">=", "<="]
    threshold: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.threshold if self.op == ">=" else ratio <= self.threshold

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}x"


@dataclasses.dataclass(frozen=True, slots=True)
class Comparison:
    """One row of the report: tidings' figure next to a reference figure, and their ratio.

    ``value`` and ``reference_value`` are medians of the samples. For throughput rows higher is
    better and the aim is ``>=``; for memory rows lower is better and the aim is ``<=``.
    """

    scenario: str
    title: str
    unit: str
    value: float
    samples: tuple[float, ...]
    reference: str
    reference_value: float
    reference_samples: tuple[float, ...]
    aim: Aim | None
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.value / self.reference_value if self.reference_value else float("inf")

    @property
    def met(self) -> bool | None:
        return None if self.aim is None else self.aim.met(self.ratio)


def compare(
    scenario: str,
    title: str,
    unit: str,
    samples: list[float],
    reference: str,
    reference_samples: list[float],
    aim: Aim | None,
    note: str = "",
) -> Comparison:
    return Comparison(
        scenario=scenario,
        title=title,
        unit=unit,
        value=statistics.median(samples),
        samples=tuple(samples),
        reference=reference,
        reference_value=statistics.median(reference_samples),
        reference_samples=tuple(reference_samples),
        aim=aim,
        note=note,
    )


class Workspace:
    """Hands out fresh database files under one temporary root, and deletes them after use."""

    def __init__(self, root: str | None = None) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="tidings-bench-", dir=root))

    @property
    def root(self) -> Path:
        return self._root

    @contextlib.contextmanager
    def fresh_db(self, label: str) -> Iterator[Path]:
        """A path to a database file that does not exist yet, in its own directory."""
        directory = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=self._root))
        try:
            yield directory / "events.db"
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def cleanup(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)


def sqlite_url(path: Path) -> str:
    # sqlite:/// + an absolute path gives the four slashes tidings expects for absolute files.
    return f"sqlite:///{path}"


def settle() -> None:
    """Collect garbage before a timed section, so one side does not pay for the other's litter."""
    gc.collect()


@contextlib.contextmanager
def stopwatch() -> Iterator[Callable[[], float]]:
    """``with stopwatch() as elapsed: ...`` then ``elapsed()`` is the block's wall time in seconds."""
    settle()
    started = time.perf_counter()
    finished: float | None = None
    try:
        yield lambda: (finished if finished is not None else time.perf_counter()) - started
    finally:
        finished = time.perf_counter()


def current_rss() -> int | None:
    """The process's resident set size in bytes now, or None where /proc is unavailable."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def cpu_probe() -> float:
    """Milliseconds a fixed pure-Python loop takes now: a gauge of the CPU speed the host gives us.

    On a shared or frequency-scaled host the same loop can take twice as long from one second to
    the next; the report shows the spread so that a reader can tell host noise from a regression.
    """
    started = time.perf_counter()
    total = 0
    for i in range(1_000_000):
        total += i & 7
    return (time.perf_counter() - started) * 1000


def log(message: str) -> None:
    """Progress goes to stderr so that stdout carries only the report."""
    print(message, file=sys.stderr, flush=True)
