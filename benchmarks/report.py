"""Rendering results: a plain-text table for the terminal, JSON for tools, Markdown for the README."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.harness import Comparison, Sizes
from benchmarks.peer_eventsourcing import PEER_CONFIG
from benchmarks.raw_sqlite import PRAGMAS
from benchmarks.scenarios_postgres import PEER_PG_CONFIG

_COLUMNS = ("scenario", "unit", "tidings", "reference", "reference value", "ratio", "aim", "met")


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """Everything one ``python -m benchmarks`` produced, plus what is needed to reproduce it."""

    mode: str
    sizes: Sizes
    comparisons: Sequence[Comparison]
    started: datetime
    seconds: float
    environment: dict[str, Any]
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None
    others_cpu: float | None = None
    kernel_cpu: float | None = None
    """CPU seconds the kernel's threads used meanwhile (write-back of what the benchmark fsyncs)."""
    cpu_probes: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    """Per scenario, :func:`~benchmarks.harness.cpu_probe` before and after it (milliseconds)."""
    """CPU seconds used during the run by processes other than the benchmark (see quiet.py)."""
    postgres: dict[str, str] | None = None
    """The PostgreSQL server's version and durability settings, if a scenario used it."""


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _revision() -> str | None:
    """The commit the run measured, if in git; ``-dirty`` if files other than the results (which
    every run rewrites) had uncommitted changes, since those changes were measured too."""
    commit = _git("describe", "--always")
    if not commit:
        return None
    changed = _git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":(exclude)benchmarks/results.json",
        ":(exclude)benchmarks/results.md",
    )
    return f"{commit}-dirty" if changed else commit


def environment() -> dict[str, Any]:
    return {
        "revision": _revision(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "sqlite": sqlite3.sqlite_version,
        "tidings": version("tidings"),
        "eventsourcing": version("eventsourcing"),
        "psycopg": version("psycopg"),
    }


def fairness() -> dict[str, Any]:
    """How both sides were configured, so that a reader can check the comparison is fair."""
    return {
        "tidings": {
            "url": "sqlite:///<fresh temp file per scenario> (defaults: WAL, synchronous=FULL)",
            "pragmas": list(PRAGMAS),
            "verified": "journal_mode and synchronous read back through store.query on every open",
        },
        "eventsourcing": {
            "env": PEER_CONFIG,
            "pragmas": ["journal_mode=WAL (set by eventsourcing)", "synchronous=FULL (SQLite's default)"],
            "verified": "journal_mode and synchronous read back from its pooled connection on every open",
        },
        "raw_sqlite3": {"pragmas": list(PRAGMAS), "table": "tidings_events, created by tidings"},
        "processing": {
            "tidings": "Service.add_projection / @service.handles on the SQLite store above; default "
            "SubscriptionConfig (batch_size 500)",
            "eventsourcing_projection": "eventsourcing.projection.ProjectionRunner + Projection with a "
            "SQLiteTrackingRecorder view (one transaction per event); APPLICATION_RECORDER_TOPIC = "
            "benchmarks.peer_processing:SubscribableSQLiteRecorder (adds subscribe(), which the SQLite "
            "recorder lacks, using eventsourcing's own ListenNotifySubscription pull thread)",
            "eventsourcing_follower": "eventsourcing.system.MultiThreadedRunner, Leader -> "
            "ProcessApplication, each application in its own SQLite file",
        },
        "postgresql": {
            "server": "one server for both libraries; fsync, synchronous_commit and full_page_writes "
            "at their defaults (on), read back before the run",
            "tidings": "postgresql://<server>?schema=<fresh schema per repetition>, defaults otherwise "
            "(pool_size 10)",
            "eventsourcing": PEER_PG_CONFIG,
            "raw_copy": "psycopg COPY ... FROM STDIN (FORMAT BINARY) into an empty tidings_events "
            "table created by tidings, one transaction",
        },
    }


def _number(value: float, unit: str) -> str:
    if unit.startswith(("MiB", "ms", "CPU", "%")):
        return f"{value:,.2f}"
    return f"{value:,.0f}"


def _met(comparison: Comparison) -> str:
    met = comparison.met
    return "-" if met is None else ("yes" if met else "NO")


def _cells(c: Comparison) -> tuple[str, ...]:
    return (
        c.scenario,
        c.unit,
        _number(c.value, c.unit),
        c.reference,
        _number(c.reference_value, c.unit),
        f"{c.ratio:.2f}x",
        "-" if c.aim is None else str(c.aim),
        _met(c),
    )


def _notes(comparisons: Sequence[Comparison]) -> list[str]:
    titles = dict.fromkeys(c.scenario + ": " + c.title.split(": ", 1)[-1] for c in comparisons)
    notes = [f"{c.scenario} vs {c.reference}: {c.note}" for c in comparisons if c.note]
    return list(titles) + notes


def _load_note(run: Run) -> str:
    if run.load_before is None:
        return ""
    note = f" Load average before the run: {run.load_before[0]:.2f} (1 min)"
    if run.others_cpu is not None:
        # Not the load average after the run: the benchmark itself keeps the CPUs busy.
        share = 100 * run.others_cpu / run.seconds if run.seconds else 0.0
        note += f"; other processes used {run.others_cpu:.1f} CPU-seconds during it ({share:.0f}% of one CPU)"
    if run.cpu_probes:
        values = [v for pair in run.cpu_probes.values() for v in pair]
        note += (
            f"; a fixed CPU probe loop took {min(values):.0f}-{max(values):.0f} ms across the run "
            "(the spread is the host's speed varying)"
        )
    return note + "."


def text_table(run: Run) -> str:
    rows = [_COLUMNS, *(_cells(c) for c in run.comparisons)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    right = {2, 4, 5}

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()

    out = [line(rows[0]), line(["-" * w for w in widths]), *(line(r) for r in rows[1:])]
    met = [c.met for c in run.comparisons if c.met is not None]
    out.append("")
    out.append(f"aims met: {sum(met)} of {len(met)}   ({run.mode} run, {run.seconds:.0f} s){_load_note(run)}")
    out.extend(f"  {note}" for note in _notes(run.comparisons))
    if run.postgres:
        out.append(f"  PostgreSQL: {_postgres_line(run.postgres)}")
    return "\n".join(out)


def _postgres_line(settings: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in settings.items() if k != "source")


def markdown(run: Run) -> str:
    env = run.environment
    header = "| " + " | ".join(_COLUMNS) + " |"
    align = "|" + "|".join("---:" if i in (2, 4, 5) else "---" for i in range(len(_COLUMNS))) + "|"
    body = ["| " + " | ".join(_cells(c)) + " |" for c in run.comparisons]
    met = [c.met for c in run.comparisons if c.met is not None]
    lines = [
        "# Benchmark results",
        "",
        f"Generated by `python -m benchmarks{' --quick' if run.mode == 'quick' else ''}` on "
        f"{run.started:%Y-%m-%d %H:%M} UTC ({run.seconds:.0f} s): Python {env['python']}, "
        f"SQLite {env['sqlite']}, {env['cpus']} CPUs, {env['platform']}; tidings {env['tidings']} "
        f"(revision {env['revision']}) against eventsourcing {env['eventsourcing']}.{_load_note(run)}",
        "",
        "Ratios are tidings / reference (medians of the repeats); throughput rows aim high, latency and"
        " memory rows aim low; a reference named `aim: ...` is the issue's absolute target. Aims met: "
        + f"{sum(met)} of {len(met)}.",
        "",
        header,
        align,
        *body,
        "",
        *(f"- {note}" for note in _notes(run.comparisons)),
        "",
        "Durability is the same on every side: WAL with `synchronous=FULL`. eventsourcing is configured "
        "with " + ", ".join(f"`{k}={v}`" for k, v in PEER_CONFIG.items() if v) + " and otherwise its "
        "defaults (no snapshots, no aggregate cache, JSON transcoder). Both libraries' pragmas are read "
        "back from their own connections every time a database is opened, and a run stops if either "
        "is not WAL + FULL.",
        "",
        *_markdown_processing(run),
        *_markdown_postgres(run),
        *_markdown_growth(run),
    ]
    return "\n".join(lines)


def _markdown_processing(run: Run) -> list[str]:
    if not any(c.scenario in ("projection_catchup", "live_latency") for c in run.comparisons):
        return []
    return [
        "Processing peers: eventsourcing's `ProjectionRunner` with a `Projection` writing through a "
        "`SQLiteTrackingRecorder` view (the upsert and the tracking record in one transaction per "
        "event -- its API is per event), on an application recorder that adds the `subscribe()` the "
        "SQLite recorder lacks by returning eventsourcing's own `ListenNotifySubscription` "
        "(`APPLICATION_RECORDER_TOPIC`); and, for latency, its `system.MultiThreadedRunner` (a leader "
        "prompting a `ProcessApplication` follower in its own thread, each application in its own "
        "file). tidings runs the same SQL through `Service.add_projection` and `@service.handles` "
        "with default settings.",
        "",
    ]


def _markdown_postgres(run: Run) -> list[str]:
    if not run.postgres:
        return []
    return [
        f"PostgreSQL: {_postgres_line(run.postgres)}; {run.postgres.get('source', '')}. Both libraries "
        "use the same server; every repetition of each library runs in a fresh schema, dropped after. "
        "eventsourcing is configured with "
        + ", ".join(f"`{k}={v}`" for k, v in PEER_PG_CONFIG.items())
        + " and its defaults otherwise (pool 5 + 10 overflow, table lock per insert, no database "
        "functions); tidings with `postgresql://...?schema=...` and its defaults.",
        "",
    ]


def growth_table(comparisons: Sequence[Comparison]) -> list[str]:
    """The growth rows as one Markdown table: a row per measurement, a column per store size.

    Each cell is the ratio to the empty store measured alongside, then the two figures; the space
    rows give MB per million events and the payload beside it.
    """
    backends = {"growth_sqlite": "SQLite", "growth_pg": "PostgreSQL"}
    rows = [c for c in comparisons if c.scenario in backends]
    if not rows:
        return []

    def split(unit: str) -> tuple[str, str]:
        *what, stored = unit.split(", ")
        return ", ".join(what), stored.removesuffix(" stored")

    columns = list(dict.fromkeys(split(c.unit)[1] for c in rows))
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for c in rows:
        what, size = split(c.unit)
        key = (backends[c.scenario], what)
        if c.unit.startswith("MB"):
            text = f"{c.value:,.0f} MB (payload {c.reference_value:,.0f} MB)"
        elif c.unit.startswith("CPU"):
            text = f"{c.ratio:.2f}x ({c.value:,.1f} vs {c.reference_value:,.1f})"
        else:
            text = f"{c.ratio:.2f}x ({c.value:,.0f} vs {c.reference_value:,.0f})"
        cells.setdefault(key, {})[size] = text
    lines = [
        "| store | measurement | " + " | ".join(f"{size} events stored" for size in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for (backend, what), by_size in cells.items():
        lines.append(
            f"| {backend} | {what} | " + " | ".join(by_size.get(size, "-") for size in columns) + " |"
        )
    return lines


def _markdown_growth(run: Run) -> list[str]:
    table = growth_table(run.comparisons)
    if not table:
        return []
    return [
        "Growth (tidings only): each measurement on a store already holding N events against the same "
        "measurement on an empty store opened beside it, repetitions alternating between the two; "
        "ratio (grown vs empty: events/s, aim >= 0.8x, i.e. within 1.25x; on SQLite also the process's "
        "CPU microseconds per event, aim <= 1.25x), and the space the events "
        "table with its indexes takes per million events next to the events' own payload:",
        "",
        *table,
        "",
    ]


def as_json(run: Run) -> str:
    document = {
        "mode": run.mode,
        "started": run.started.astimezone(UTC).isoformat(),
        "seconds": round(run.seconds, 1),
        "load_average_before": run.load_before,
        "load_average_after": run.load_after,
        "other_processes_cpu_seconds": None if run.others_cpu is None else round(run.others_cpu, 1),
        "kernel_threads_cpu_seconds": None if run.kernel_cpu is None else round(run.kernel_cpu, 1),
        "cpu_probe_ms_before_after": {k: [round(v, 1) for v in pair] for k, pair in run.cpu_probes.items()},
        "environment": run.environment,
        "postgresql": run.postgres,
        "configuration": fairness(),
        "sizes": dataclasses.asdict(run.sizes),
        "results": [
            {
                "scenario": c.scenario,
                "title": c.title,
                "unit": c.unit,
                "tidings": c.value,
                "tidings_samples": list(c.samples),
                "reference": c.reference,
                "reference_value": c.reference_value,
                "reference_samples": list(c.reference_samples),
                "ratio": c.ratio,
                "aim": None if c.aim is None else str(c.aim),
                "met": c.met,
                "note": c.note,
            }
            for c in run.comparisons
        ],
    }
    return json.dumps(document, indent=2) + "\n"


def write(run: Run, directory: Path) -> tuple[Path, Path]:
    json_path = directory / "results.json"
    md_path = directory / "results.md"
    json_path.write_text(as_json(run))
    md_path.write_text(markdown(run))
    return json_path, md_path
