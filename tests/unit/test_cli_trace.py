"""``tidings trace REF`` against real SQLite files: the tree, ``--json``, narrow terminals, errors;
and ``tidings events`` in a narrow terminal."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner, Result

from tidings import DeadLetterRecord, ProcessedBatch, TrackingStore, build_trace, open_store
from tidings.cli import app
from tidings.cli.trace import parse_sources, render_trace
from tidings.errors import InvalidArgument
from tidings.testing.events import Credited, Noted

LONG_TYPE = "tidings.testing.Credited"
DEPTH = 12


def invoke(*args: str, columns: int = 200, env: Mapping[str, str | None] | None = None) -> Result:
    base: dict[str, str | None] = {"COLUMNS": str(columns), "TIDINGS_STORE": None}
    return CliRunner().invoke(app, list(args), env={**base, **(env or {})})


class World:
    def __init__(self, directory: Path) -> None:
        self.orders = f"sqlite:///{directory}/orders.db"
        self.mail = f"sqlite:///{directory}/mail.db"
        self.root = uuid.uuid4()
        self.reserved = uuid.uuid4()
        self.chain = [uuid.uuid4() for _ in range(DEPTH)]

    async def build(self) -> None:
        root = str(self.root)
        async with open_store(self.orders) as orders, open_store(self.mail) as mail:
            await orders.append("order-1", [Noted(text="placed")], event_ids=[self.root])
            await orders.append(
                "stock-1",
                [Credited(amount=1)],
                event_ids=[self.reserved],
                metadata={
                    "correlation_id": root,
                    "causation_id": root,
                    "caused_by": "handler:inventory.reserve",
                    "service": "inventory",
                    "compensation": True,
                },
            )
            cause = self.reserved
            for i, event_id in enumerate(self.chain):
                meta = {"correlation_id": root, "causation_id": str(cause), "caused_by": "handler:mail.send"}
                await mail.append(f"mail-{i}", [Noted(text=str(i))], event_ids=[event_id], metadata=meta)
                cause = event_id
            assert isinstance(mail, TrackingStore)
            first = self.chain[0]
            record = DeadLetterRecord(1, first, "mail-0", "tidings.testing.Noted", "SMTP down", "tb", 3)
            await mail.commit_processed(
                ProcessedBatch(group="mail.send", expected_checkpoint=0, checkpoint=0, dead_letters=(record,))
            )


@pytest.fixture
def world(tmp_path: Path) -> World:
    made = World(tmp_path)
    asyncio.run(made.build())
    return made


def test_the_tree(world: World) -> None:
    result = invoke("trace", "order-1", "--store", world.orders, "--store", f"mail={world.mail}")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "trace of order-1" in out and f"{DEPTH + 2} events in orders, inventory, mail" in out
    lines = out.splitlines()
    # Each event's type on its own line; the caused events indented under their cause.
    placed = next(i for i, line in enumerate(lines) if "tidings.testing.Noted" in line)
    reserved = next(i for i, line in enumerate(lines) if LONG_TYPE in line)
    assert reserved > placed and lines[reserved].index(LONG_TYPE) > lines[placed].index("tidings.testing")
    assert "inventory stock-1@1 handler:inventory.reserve +" in out
    assert "↺ compensation" in out
    assert "✗ dead-lettered by mail.send after 3 attempts: SMTP down" in out
    assert all(f"mail-{i}@1" in out for i in range(DEPTH))


def test_json_is_the_traces_dict(world: World) -> None:
    for ref in ("order-1", str(world.root), str(world.chain[-1])):
        result = invoke("trace", ref, "--json", "--store", world.orders, "--store", f"mail={world.mail}")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["ref"] == ref and data["correlation_ids"] == [str(world.root)]
        assert data["sources"] == ["orders", "mail"] and data["count"] == DEPTH + 2
        nodes = data["nodes"]
        assert [n["depth"] for n in nodes] == list(range(DEPTH + 2))
        assert nodes[1]["compensation"] is True and nodes[1]["service"] == "inventory"
        assert nodes[2]["dead_lettered"][0]["group"] == "mail.send"
        assert nodes[2]["dead_lettered"][0]["attempts"] == 3
        assert nodes[-1]["event_id"] == str(world.chain[-1]) and nodes[-1]["children"] == []


@pytest.mark.parametrize("columns", [40, 60])
def test_narrow_terminals_show_every_event_and_whole_types(world: World, columns: int) -> None:
    result = invoke(
        "trace", "order-1", "--store", world.orders, "--store", f"mail={world.mail}", columns=columns
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns
    assert sum(LONG_TYPE in line for line in lines) == 1  # the type is whole, on one line
    for i in range(DEPTH):
        assert any(f"mail-{i}@1" in line for line in lines), (i, result.stdout)
    if columns == 40:
        assert "⤷ continued: caused by" in result.stdout  # a deep branch went on below


def test_rendering_at_any_width(world: World) -> None:
    async def trace_of() -> object:
        async with open_store(world.orders) as orders, open_store(world.mail) as mail:
            return await build_trace({"orders": orders, "mail": mail}, "order-1")

    trace = asyncio.run(trace_of())
    for width in (12, 40, 200):
        console = Console(width=width, record=True, color_system=None)
        console.print(render_trace(trace, width))  # type: ignore[arg-type]
        lines = console.export_text().splitlines()
        assert max(len(line) for line in lines) <= width
        # Every event is there (whatever the folding): the labels read back without the guides.
        flat = "".join(line.lstrip(" │├└─⤷") for line in lines)
        assert all(f"mail-{i}@1" in flat for i in range(DEPTH)), flat


def test_errors(world: World, tmp_path: Path) -> None:
    unknown = invoke("trace", "order-404", "--store", world.orders)
    assert unknown.exit_code == 1 and "no event id, correlation id or stream 'order-404'" in unknown.output
    missing = invoke("trace", "order-1", "--store", f"sqlite:///{tmp_path}/none.db")
    assert missing.exit_code == 1 and "does not exist" in missing.output
    assert not (tmp_path / "none.db").exists()
    twice = invoke("trace", "order-1", "--store", f"a={world.orders}", "--store", f"a={world.mail}")
    assert twice.exit_code == 2 and "given twice" in twice.output
    empty = invoke("trace", " ", "--store", world.orders)
    assert empty.exit_code == 1 and "ref is empty" in empty.output
    default = invoke("trace", "order-1", env={"TIDINGS_STORE": world.orders})
    assert default.exit_code == 0 and "2 events in orders, inventory" in default.stdout


def test_store_labels() -> None:
    assert parse_sources(["sqlite:///a/orders.db", "sqlite:///b/orders.db", "pay=memory://"]) == {
        "orders": "sqlite:///a/orders.db",
        "orders-2": "sqlite:///b/orders.db",
        "pay": "memory://",
    }
    assert list(parse_sources(["postgresql://u@h/db?schema=billing", "postgresql://u@h/shop"])) == [
        "billing",
        "shop",
    ]
    for bad in (["=memory://"], ["a b=memory://"], ["x="]):
        with pytest.raises(InvalidArgument):
            parse_sources(bad)


def test_events_in_a_narrow_terminal(world: World) -> None:
    for args in (["events", "stock-1"], ["events", "--all"]):
        result = invoke(*args, "--store", world.orders, columns=40)
        assert result.exit_code == 0, result.output
        assert "…" not in result.stdout
        assert max(len(line) for line in result.stdout.splitlines()) <= 40
        assert any(LONG_TYPE in line for line in result.stdout.splitlines())
    as_json = invoke("events", "--all", "--json", "--store", world.orders, columns=40)
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [e["stream_id"] for e in events] == ["order-1", "stock-1"]
    assert events[1]["metadata"]["caused_by"] == "handler:inventory.reserve"


def test_the_store_variable_is_one_url_even_with_a_space(tmp_path: Path) -> None:
    spaced = tmp_path / "my stores"
    spaced.mkdir()
    made = World(spaced)
    asyncio.run(made.build())
    result = invoke("trace", "order-1", "--json", env={"TIDINGS_STORE": made.orders})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["count"] == 2  # the orders store alone: order-1 and stock-1
