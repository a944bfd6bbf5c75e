"""Regression tests for defects found by using the ``tidings`` command as a new user.

Real SQLite files, the CLI runner for one-shot commands, and real processes (``tidings run``,
a rebuild killed with SIGKILL) synchronised on their output lines, never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pytest
import typer.main
from typer.testing import CliRunner, Result

from tidings import open_store
from tidings.cli import app

TIMEOUT = 30.0

SHOP = textwrap.dedent(
    """
    import asyncio
    import os
    import sys
    import threading
    from pathlib import Path

    from tidings import Event, Projection, ProjectionTx, RetryPolicy, Service, SubscriptionConfig

    class Paid(Event):
        __event_type__ = "shop.Paid"
        amount: int

    class Order(Event):
        __event_type__ = "shop.Order"
        order_id: str

    class Revenue(Projection):
        name = "revenue"
        tables = {"revenue": "CREATE TABLE {revenue} (k TEXT PRIMARY KEY, total INTEGER)"}

        def paid(self, event: Paid, tx: ProjectionTx) -> None:
            if str(event.amount) == os.environ.get("SHOP_BLOCK_PROJECTION_AT"):
                print(f"projection blocked at {event.amount}", file=sys.stderr, flush=True)
                threading.Event().wait()  # until the process is killed
            tx.execute(
                "INSERT INTO {revenue} VALUES ('all', ?) ON CONFLICT (k) "
                "DO UPDATE SET total = {revenue}.total + excluded.total",
                (event.amount,),
            )

    NOTIFY_FAILS = {13: "card declined", 17: "no e-mail address"}
    AUDIT_FAILS = {13: "audit log full"}
    CONFIG = SubscriptionConfig(poll_interval=0.05, retry=RetryPolicy(max_attempts=2, initial_delay=0.001))


    def wait_in_thread(gate: Path) -> None:
        tick = threading.Event()
        while not gate.exists():
            tick.wait(0.01)


    def make() -> Service:
        service = Service("shop", store=os.environ.get("SHOP_OWN_STORE"), config=CONFIG)
        service.add_projection(Revenue())

        @service.handles(Paid)
        async def notify(event: Paid) -> None:
            if event.amount in NOTIFY_FAILS:
                raise RuntimeError(f"cannot notify about {event.amount}: {NOTIFY_FAILS[event.amount]}")
            gate = os.environ.get("SHOP_GATE")
            if gate:
                print(f"handling {event.amount}", file=sys.stderr, flush=True)
                if os.environ.get("SHOP_GATE_IN_THREAD"):
                    await asyncio.to_thread(wait_in_thread, Path(gate))
                # Polls the gate (a condition): the test opens it by creating the file.
                while not Path(gate).exists():
                    await asyncio.sleep(0.01)

        @service.handles(Paid)
        async def audit(event: Paid) -> None:
            if event.amount in AUDIT_FAILS:
                raise RuntimeError(AUDIT_FAILS[event.amount])

        return service


    service = make()

    plain = Service("plain", config=CONFIG)

    @plain.handles(Paid)
    async def ignore(event: Paid) -> None:
        pass

    def broken() -> Service:
        raise ValueError("no configuration")
    """
)


@pytest.fixture
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A working directory holding ``shop.py``, made the current one; no TIDINGS_STORE leaks in."""
    (tmp_path / "shop.py").write_text(SHOP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("TIDINGS_STORE", raising=False)
    monkeypatch.delenv("SHOP_OWN_STORE", raising=False)
    sys.modules.pop("shop", None)
    yield tmp_path
    sys.modules.pop("shop", None)


def invoke(*args: str, env: Mapping[str, str | None] | None = None, columns: int = 200) -> Result:
    base: dict[str, str | None] = {"COLUMNS": str(columns), "TIDINGS_STORE": None}
    return CliRunner().invoke(app, list(args), env={**base, **(env or {})})


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def seed(url: str, *amounts: int, stream: str = "pay-1") -> None:
    import shop  # type: ignore[import-not-found]

    async def go() -> None:
        async with open_store(url) as store:
            for amount in amounts:
                await store.append(stream, [shop.Paid(amount=amount)], metadata={"user_id": "ann"})

    asyncio.run(go())


def process_all(url: str) -> None:
    """Run the shop service in this process until every group has seen the whole log."""
    import shop

    async def go() -> None:
        async with open_store(url) as store:
            service = shop.make()
            service.use_store(store)
            head = await store.head()
            async with service.running():
                assert await service.wait_for(head, timeout=TIMEOUT)

    asyncio.run(go())


def projection_generation(url: str) -> list[dict[str, Any]]:
    return json_lines(invoke("projections", "status", "--json", "--store", url).stdout)


class Lines:
    """Reads a child's pipe on a thread, so the test can wait for a line with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.seen: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)

    def wait_for(self, pattern: str) -> str:
        """The next line containing ``pattern`` (lines before it are kept in ``seen``)."""
        while True:
            line = self._lines.get(timeout=TIMEOUT)
            self.seen.append(line)
            if pattern in line:
                return line


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def tidings(*args: str, cwd: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tidings.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(cwd), **(env or {})},
        preexec_fn=_sigint_default,
    )


# -- 1. TIDINGS_STORE for the commands that load a service; the run banner names the store -----


def test_service_commands_take_the_store_from_the_environment(shop: Path) -> None:
    url = f"sqlite:///{shop}/env.db"
    seed(url, 5, 13)
    process_all(url)
    [dead] = [
        d
        for d in json_lines(invoke("dlq", "list", "--json", "--store", url).stdout)
        if d["group"] == "shop.audit"
    ]
    import shop as module

    module.AUDIT_FAILS.clear()
    retried = invoke("dlq", "retry", str(dead["id"]), "--app", "shop:make", env={"TIDINGS_STORE": url})
    assert retried.exit_code == 0, retried.output
    rebuilt = invoke("projections", "rebuild", "revenue", "--app", "shop:make", env={"TIDINGS_STORE": url})
    assert rebuilt.exit_code == 0, rebuilt.output
    assert projection_generation(url)[0]["generation"] == 2
    assert not (shop / "tidings.db").exists()


def test_store_precedence_flag_env_service_default(shop: Path) -> None:
    flag, env, own = (f"sqlite:///{shop}/{name}.db" for name in ("flag", "env", "own"))
    for url in (flag, env, own):
        seed(url, 5)  # a rebuild needs an existing store
    rebuild = ["projections", "rebuild", "revenue", "--app", "shop:make"]

    def used(**env_vars: str) -> None:
        result = invoke(
            *rebuild, *([] if "flag" not in env_vars else ["--store", env_vars.pop("flag")]), env=env_vars
        )
        assert result.exit_code == 0, result.output

    used(flag=flag, TIDINGS_STORE=env, SHOP_OWN_STORE=own)
    assert [p["generation"] for p in projection_generation(flag)] == [2]
    used(TIDINGS_STORE=env, SHOP_OWN_STORE=own)
    assert [p["generation"] for p in projection_generation(env)] == [2]
    used(SHOP_OWN_STORE=own)
    assert [p["generation"] for p in projection_generation(own)] == [2]
    used()
    assert [p["generation"] for p in projection_generation("sqlite:///tidings.db")] == [2]
    # Each run touched exactly one store.
    assert [p["generation"] for p in projection_generation(flag)] == [2]
    assert [p["generation"] for p in projection_generation(env)] == [2]


def test_run_banner_names_the_store_without_its_password(shop: Path) -> None:
    with tidings("run", "shop:plain", cwd=shop, env={"TIDINGS_STORE": "memory://ann:s3cret@host"}) as proc:
        try:
            assert proc.stderr is not None
            banner = Lines(proc.stderr).wait_for("running")
            assert "memory://ann:***@host" in banner
            assert "s3cret" not in banner
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


# -- 2. APP that is not a service, or cannot be loaded: one clear line, exit code 2 --------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("shop:Order", "shop:Order is the class shop.Order; expected a tidings.Service instance"),
        ("shop:NOTIFY_FAILS", "shop:NOTIFY_FAILS is a builtins.dict; expected a tidings.Service"),
        ("shop:os", "shop:os is the module os; expected a tidings.Service"),
        ("shop:broken", "shop:broken() failed: ValueError: no configuration"),
        ("shop:nothing", "module 'shop' has no attribute 'nothing'"),
        ("nosuchshop:service", "no module named 'nosuchshop'"),
        ("shop", "expected APP as module:attribute"),
        ("shop:service:x", "expected APP as module:attribute"),
        (":service", "expected APP as module:attribute"),
    ],
)
def test_app_that_is_not_a_service(shop: Path, spec: str, message: str) -> None:
    url = f"sqlite:///{shop}/app.db"
    for args in (
        ["run", spec],
        ["dlq", "retry", "1", "--app", spec],
        ["projections", "rebuild", "revenue", "--app", spec],
    ):
        result = invoke(*args, "--store", url)
        assert result.exit_code == 2, (args, result.output)
        assert result.stdout == ""
        assert result.stderr == f"error: {message}" + result.stderr.removeprefix(f"error: {message}")
        assert len(result.stderr.strip().splitlines()) == 1
        assert "Traceback" not in result.output
    assert not (shop / "app.db").exists()


def test_a_module_that_fails_to_import_is_named(shop: Path) -> None:
    (shop / "badshop.py").write_text("import nosuchdependency\n")
    result = invoke("run", "badshop:service")
    assert result.exit_code == 2
    assert (
        "importing 'badshop' failed: ModuleNotFoundError: No module named 'nosuchdependency'" in result.stderr
    )


def test_service_store_error_names_no_missing_method(shop: Path) -> None:
    import shop as module

    with pytest.raises(Exception, match=r"await service.open\(\) or service.run\(\)") as raised:
        _ = module.make().store
    assert "start()" not in str(raised.value)


# -- 3. dlq show: the event; dlq retry: the new error, --group and --all -------------------------


def test_dlq_show_prints_the_event_data_and_metadata(shop: Path) -> None:
    url = f"sqlite:///{shop}/dlq.db"
    seed(url, 5, 13)
    process_all(url)
    letters = json_lines(invoke("dlq", "list", "--json", "--store", url).stdout)
    [dead] = [d for d in letters if d["group"] == "shop.notify"]
    shown = invoke("dlq", "show", str(dead["id"]), "--store", url, "--json")
    assert shown.exit_code == 0, shown.output
    [full] = json_lines(shown.stdout)
    assert full["data"] == {"amount": 13}
    assert full["metadata"]["user_id"] == "ann"
    assert (full["group"], full["position"], full["stream_id"], full["version"]) == (
        "shop.notify",
        2,
        "pay-1",
        2,
    )
    assert "RuntimeError: cannot notify about 13: card declined" in full["traceback"]
    text = invoke("dlq", "show", str(dead["id"]), "--store", url)
    assert text.exit_code == 0, text.output
    assert '"amount": 13' in text.stdout  # pretty JSON, one key per line
    assert '"user_id": "ann"' in text.stdout
    assert "shop.notify" in text.stdout and "pay-1, version 2" in text.stdout
    assert "cannot notify about 13: card declined" in text.stdout


def test_dlq_retry_prints_the_new_error(shop: Path) -> None:
    url = f"sqlite:///{shop}/dlq.db"
    seed(url, 13)
    process_all(url)
    [dead] = [
        d
        for d in json_lines(invoke("dlq", "list", "--json", "--store", url).stdout)
        if d["group"] == "shop.notify"
    ]
    import shop as module

    module.NOTIFY_FAILS[13] = "card expired"
    failed = invoke("dlq", "retry", str(dead["id"]), "--app", "shop:make", "--store", url)
    assert failed.exit_code == 1
    assert (
        f"dead letter {dead['id']} failed again: RuntimeError: cannot notify about 13: card expired"
        in failed.stderr
    )
    [still] = [
        d for d in json_lines(invoke("dlq", "list", "--json", "--store", url).stdout) if d["id"] == dead["id"]
    ]
    assert "card expired" in still["error"] and still["attempts"] == dead["attempts"] + 1


def test_dlq_retry_group_and_all(shop: Path) -> None:
    url = f"sqlite:///{shop}/dlq.db"
    seed(url, 13, 5, 17)
    process_all(url)
    letters = json_lines(invoke("dlq", "list", "--json", "--store", url).stdout)
    assert sorted((d["group"], d["position"]) for d in letters) == [
        ("shop.audit", 1),
        ("shop.notify", 1),
        ("shop.notify", 3),
    ]
    import shop as module

    del module.NOTIFY_FAILS[13]  # 13 is fixed for notify; 17 still fails
    result = invoke("dlq", "retry", "--group", "shop.notify", "--app", "shop:make", "--store", url)
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("processed") and "shop.notify position 1" in line for line in lines)
    assert any(
        line.startswith("failed") and "shop.notify position 3" in line and "no e-mail address" in line
        for line in lines
    )
    assert "2 retried in group shop.notify: 1 processed and removed, 1 failed again" in result.stdout
    left = json_lines(invoke("dlq", "list", "--json", "--store", url).stdout)
    assert sorted((d["group"], d["position"]) for d in left) == [("shop.audit", 1), ("shop.notify", 3)]

    module.NOTIFY_FAILS.clear()
    module.AUDIT_FAILS.clear()
    result = invoke("dlq", "retry", "--all", "--app", "shop:make", "--store", url, "--json")
    assert result.exit_code == 0, result.output
    *outcomes, summary = json_lines(result.stdout)
    assert sorted((o["group"], o["position"], o["outcome"]) for o in outcomes) == [
        ("shop.audit", 1, "processed"),
        ("shop.notify", 3, "processed"),
    ]
    assert summary == {"summary": {"retried": 2, "processed": 2, "failed": 0}}
    assert invoke("dlq", "list", "--json", "--store", url).stdout == ""
    result = invoke("dlq", "retry", "--all", "--app", "shop:make", "--store", url)
    assert result.exit_code == 0 and "no dead letters in all groups" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of ID, --group GROUP or --all"),
        (["1", "--all"], "exactly one of ID, --group GROUP or --all"),
        (["--group", "shop.notify", "--all"], "exactly one of ID, --group GROUP or --all"),
        (["--group", "nobody"], "service 'shop' has no subscription group 'nobody'"),
    ],
)
def test_dlq_retry_usage_errors(shop: Path, args: list[str], message: str) -> None:
    url = f"sqlite:///{shop}/dlq.db"
    seed(url, 5)
    result = invoke("dlq", "retry", *args, "--app", "shop:make", "--store", url)
    assert result.exit_code == 2, result.output
    assert message in result.output


# -- 4. projections rebuild --force takes over a rebuild killed midway -----------------------------


def test_rebuild_force_takes_over_a_killed_rebuild(shop: Path) -> None:
    url = f"sqlite:///{shop}/rebuild.db"
    seed(url, 5, 7, 9)
    rebuild = ["projections", "rebuild", "revenue", "--app", "shop:make", "--store", url]
    with tidings(*rebuild, cwd=shop, env={"SHOP_BLOCK_PROJECTION_AT": "7"}) as proc:
        try:
            assert proc.stderr is not None
            Lines(proc.stderr).wait_for("projection blocked at 7")
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=TIMEOUT) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    [status] = projection_generation(url)
    assert (status["generation"], status["building"]) == (1, 2)

    refused = invoke(*rebuild)
    assert refused.exit_code == 1
    assert "already being rebuilt (generation 2)" in refused.stderr and "--force" in refused.stderr
    assert "--force" in invoke("projections", "rebuild", "--help").stdout

    forced = invoke(*rebuild, "--force")
    assert forced.exit_code == 0, forced.output
    assert "generation 3 is now serving" in forced.stdout
    [status] = projection_generation(url)
    assert (status["generation"], status["building"], status["lag"]) == (3, None, 0)

    async def inspect() -> tuple[list[tuple[Any, ...]], list[str], dict[str, int]]:
        async with open_store(url) as store:
            tables = await store.query(
                "SELECT name FROM sqlite_master WHERE name LIKE 'revenue%' ORDER BY name"
            )
            return (
                await store.query("SELECT total FROM revenue"),
                [t[0] for t in tables],
                await store.checkpoints(),
            )

    total, tables, checkpoints = asyncio.run(inspect())
    assert total == [(21,)]
    assert tables == ["revenue", "revenue__g3"]  # the abandoned g2 and the replaced g1 are gone
    assert [g for g in checkpoints if g.startswith("projection:")] == ["projection:revenue:g3"]


# -- 5. tables in narrow terminals never split an id -------------------------------------------------

LONG_STREAM = "customer-account-0123456789abcdef-with-a-rather-long-identifier"
LONG_TYPE = "shop.Paid"


@pytest.mark.parametrize("columns", [60, 80])
def test_narrow_terminals_keep_ids_whole(shop: Path, columns: int) -> None:
    url = f"sqlite:///{shop}/narrow.db"
    seed(url, 13, stream=LONG_STREAM)
    seed(url, 5, stream="pay-2")
    process_all(url)
    groups = ["projection:revenue:g1", "shop.audit", "shop.notify"]
    for args, ids in [
        (["streams"], [LONG_STREAM, "pay-2"]),
        (["events", "--all"], [LONG_STREAM, "pay-2", LONG_TYPE]),
        (["events", LONG_STREAM], [LONG_STREAM, LONG_TYPE]),
        (["groups"], groups),
        (["dlq", "list"], [LONG_STREAM, "shop.notify", "shop.audit", LONG_TYPE]),
        (["projections", "status"], ["revenue"]),
        (["dlq", "show", "1"], [LONG_STREAM, LONG_TYPE]),
    ]:
        result = invoke(*args, "--store", url, columns=columns)
        assert result.exit_code == 0, (args, result.output)
        lines = result.stdout.splitlines()
        for id in ids:
            assert any(id in line for line in lines), (args, columns, id, result.stdout)
        assert "…" not in result.stdout, (args, result.stdout)


def test_wide_terminals_keep_the_table(shop: Path) -> None:
    url = f"sqlite:///{shop}/wide.db"
    seed(url, 5, stream=LONG_STREAM)
    result = invoke("streams", "--store", url, columns=120)
    assert [LONG_STREAM, "1", "1"] in [line.split() for line in result.stdout.splitlines()]
    narrow = invoke("streams", "--store", url, columns=60)
    assert f"Stream         {LONG_STREAM}" in narrow.stdout  # one "field  value" line per column


# -- 6. help shows metavars, never type placeholders; every parameter has help ----------------------


def _command_paths() -> list[list[str]]:
    paths: list[list[str]] = []

    def walk(command: Any, path: list[str]) -> None:
        paths.append(path)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def test_help_has_no_placeholders_and_documents_every_parameter() -> None:
    paths = _command_paths()
    assert ["dlq", "retry"] in paths and ["db", "migrate"] in paths
    placeholder = re.compile(r"<[a-z][a-z ]*>|\{[A-Za-z_]+\}")
    for path in paths:
        result = invoke(*path, "--help", columns=100)
        assert result.exit_code == 0, (path, result.output)
        assert not placeholder.search(result.stdout), (path, result.stdout)
    root = typer.main.get_command(app)

    def params(command: Any, path: list[str]) -> Iterator[tuple[list[str], Any]]:
        for param in command.params:
            yield path, param
        for name, sub in getattr(command, "commands", {}).items():
            yield from params(sub, [*path, name])

    for path, param in params(root, []):
        assert param.help, (path, param.name)


def test_usage_line_names_the_arguments() -> None:
    assert "Usage: tidings run [OPTIONS] APP" in invoke("run", "--help").stdout
    assert "Usage: tidings dlq retry [OPTIONS] [ID]" in invoke("dlq", "retry", "--help").stdout
    assert "Usage: tidings events [OPTIONS] [STREAM]" in invoke("events", "--help").stdout


# -- 7. a second Ctrl-C forces the exit of tidings run -----------------------------------------------


def _run_with_slow_handler(
    shop: Path, in_thread: bool = False
) -> tuple[subprocess.Popen[str], Lines, str, Path]:
    url = f"sqlite:///{shop}/run.db"
    seed(url, 1)
    gate = shop / "gate"
    env = {"TIDINGS_STORE": url, "SHOP_GATE": str(gate), "SHOP_GATE_IN_THREAD": "1" if in_thread else ""}
    proc = tidings("run", "shop:service", cwd=shop, env=env)
    assert proc.stderr is not None
    lines = Lines(proc.stderr)
    assert url in lines.wait_for("running service shop on")
    lines.wait_for("handling 1")
    proc.send_signal(signal.SIGINT)
    lines.wait_for("Ctrl-C again to force")
    return proc, lines, url, gate


def _checkpoint(url: str, group: str) -> int:
    async def load() -> int:
        async with open_store(url) as store:
            return await store.load_checkpoint(group)

    return asyncio.run(load())


def test_first_ctrl_c_stops_gracefully(shop: Path) -> None:
    proc, lines, url, gate = _run_with_slow_handler(shop)
    with proc:
        try:
            gate.touch()  # the handler in hand finishes
            lines.wait_for("stopped; checkpoints saved")
            assert proc.wait(timeout=TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    assert _checkpoint(url, "shop.notify") == 1
    assert not any("Traceback" in line for line in lines.seen)


@pytest.mark.parametrize("in_thread", [False, True], ids=["awaiting", "in-a-thread"])
def test_second_ctrl_c_forces_the_exit(shop: Path, in_thread: bool) -> None:
    """Also when the handler waits in a thread, which nothing can interrupt."""
    proc, lines, url, gate = _run_with_slow_handler(shop, in_thread)
    with proc:
        try:
            proc.send_signal(signal.SIGINT)  # the handler would wait for the gate for ever
            lines.wait_for("forced stop")
            assert proc.wait(timeout=TIMEOUT) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not any("Traceback" in line for line in lines.seen)
    assert _checkpoint(url, "shop.notify") == 0  # not committed: delivered again at the next start
    assert not gate.exists()


# -- 8. events --type with a type nothing has --------------------------------------------------------


def test_events_type_that_nothing_has_warns_naming_known_types(shop: Path) -> None:
    url = f"sqlite:///{shop}/types.db"
    seed(url, 5)
    for extra in ([], ["--json"], ["pay-1"]):
        args = ["events", *extra, "--type", "Paid", "--store", url]
        if "pay-1" not in extra:
            args.insert(1, "--all")
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        assert "warning: no event type 'Paid' is registered or stored" in result.stderr
        assert "shop.Paid" in result.stderr  # the known types are named
    found = invoke("events", "--all", "--type", "shop.Paid", "--store", url, "--json")
    assert len(json_lines(found.stdout)) == 1 and found.stderr == ""
    # A known type with no events yet is not a mistake: no warning.
    quiet = invoke("events", "--all", "--type", "shop.Order", "--store", url)
    assert quiet.exit_code == 0 and quiet.stderr == ""


# -- 9. bad input: one clear line, non-zero exit, no traceback, nothing changed ----------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bad_input_everywhere(shop: Path) -> None:
    url = f"sqlite:///{shop}/bad.db"
    seed(url, 5)
    before = _digest(shop / "bad.db")
    (shop / "adir").mkdir()
    for args, code, message in [
        (["dlq", "show", "99", "--store", url], 1, "no dead letter with id 99"),
        (["dlq", "discard", "99", "--store", url], 1, "no dead letter with id 99"),
        (["dlq", "retry", "99", "--app", "shop:make", "--store", url], 1, "no dead letter with id 99"),
        (["dlq", "show", "0", "--store", url], 2, "greater than or equal to 1"),
        (["events", "--all", "--after", "-1", "--store", url], 2, "greater than or equal to 0"),
        (["projections", "rebuild", "nope", "--app", "shop:make", "--store", url], 2, "no projection 'nope'"),
    ]:
        result = invoke(*args)
        assert result.exit_code == code, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    for store in ["bogus://x", f"sqlite:///{shop}/adir"]:
        for args in [
            ["streams"],
            ["events", "--all"],
            ["groups"],
            ["dlq", "list"],
            ["dlq", "discard", "1"],
            ["projections", "status"],
            ["db", "migrate"],
            ["dlq", "retry", "1", "--app", "shop:make"],
            ["projections", "rebuild", "revenue", "--app", "shop:make"],
        ]:
            result = invoke(*args, "--store", store)
            assert result.exit_code == 1, (args, store, result.output)
            assert result.stdout == ""
            assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
            assert "Traceback" not in result.output
    assert list((shop / "adir").iterdir()) == []
    assert _digest(shop / "bad.db") == before


def test_operations_on_a_missing_sqlite_file_create_nothing(shop: Path) -> None:
    url = f"sqlite:///{shop}/typo.db"
    for args in (
        ["dlq", "retry", "1", "--app", "shop:make"],
        ["dlq", "retry", "--all", "--app", "shop:make"],
        ["projections", "rebuild", "revenue", "--app", "shop:make"],
    ):
        for how in ({"TIDINGS_STORE": url}, None):
            result = invoke(*args, *([] if how else ["--store", url]), env=how)
            assert result.exit_code == 1, (args, result.output)
            assert "does not exist" in result.stderr and "typo.db" in result.stderr
    assert not (shop / "typo.db").exists()


def test_run_with_a_bad_store_is_one_line(shop: Path) -> None:
    (shop / "adir").mkdir()
    for store in ["bogus://x", f"sqlite:///{shop}/adir"]:
        result = invoke("run", "shop:service", "--store", store)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` read-only for this process: by its mode, or, as root (who ignores modes), by
    the immutable attribute."""
    if os.geteuid() != 0:
        path.chmod(0o444)
        yield
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root, and the file system refuses chattr +i: no way to make a file read-only")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(path)], check=True)


def test_read_only_store_file(shop: Path) -> None:
    """Writing commands fail with one line and change nothing."""
    url = f"sqlite:///{shop}/ro.db"
    seed(url, 13)
    process_all(url)
    db = shop / "ro.db"
    before = _digest(db)
    with read_only(db):
        for args in (
            ["dlq", "discard", "1"],
            ["db", "migrate"],
            ["dlq", "retry", "--all", "--app", "shop:make"],
            ["projections", "rebuild", "revenue", "--app", "shop:make"],
        ):
            result = invoke(*args, "--store", url)
            assert result.exit_code == 1, (args, result.output)
            assert result.stderr.startswith("error: "), (args, result.output)
            assert len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert _digest(db) == before


# -- 10. the README's command-line section names commands that exist ---------------------------------


def test_readme_command_line_section() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Command line", 1)[1].split("\n## ", 1)[0]
    for needed in ("tidings db migrate", "tidings[postgres]", "tidings[nats]", "TIDINGS_STORE", "--force"):
        assert needed in section, needed
    [block] = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    commands = [line.split("#")[0].split() for line in block.splitlines() if line.startswith("tidings ")]
    assert len(commands) >= 10
    root = typer.main.get_command(app)
    for words in commands:
        command, path = root, []
        for word in words[1:]:
            sub = getattr(command, "commands", {}).get(word)
            if sub is None:
                break
            command, path = sub, [*path, word]
        assert path and not getattr(command, "commands", None), words  # a real leaf command
        assert invoke(*path, "--help").exit_code == 0, words


COURIER = textwrap.dedent(
    """
    from tidings import HandlerContext, IntegrationEvent, RetryPolicy, Service, SubscriptionConfig


    class ParcelShipped(IntegrationEvent):
        __source__ = "warehouse"
        __event_type__ = "clitest.ParcelShipped"
        parcel: str


    def make(store=None, bus=None):
        config = SubscriptionConfig(retry=RetryPolicy(max_attempts=1, initial_delay=0.001, max_delay=0.01))
        courier = Service("courier", store, bus=bus, config=config)

        @courier.handles(ParcelShipped)
        async def book_pickup(event: ParcelShipped, ctx: HandlerContext) -> None:
            raise ValueError("the courier is closed")

        return courier
    """
)


def test_dlq_retry_of_a_bus_letter_says_why_it_cannot(shop: Path) -> None:
    """A letter parked by a bus consumer (``<group>@bus``) is not in the service's log: retry
    fails with that reason, not with a claim that the service does not run the group."""
    (shop / "courier.py").write_text(COURIER)
    sys.modules.pop("courier", None)
    import courier  # type: ignore[import-not-found]

    from tidings import Service, TrackingStore, open_bus

    url = f"sqlite:///{shop}/courier.db"

    async def park() -> None:
        async with open_bus("memory://") as bus:
            warehouse = Service("warehouse", f"sqlite:///{shop}/warehouse.db", bus=bus)
            warehouse.publishes(courier.ParcelShipped)
            service = courier.make(url, bus)
            async with warehouse, service, warehouse.running(), service.running():
                await warehouse.publish("parcel-1", [courier.ParcelShipped(parcel="1")])
                store = service.store
                assert isinstance(store, TrackingStore)
                for _ in range(600):
                    if await store.dead_letters():
                        return
                    await asyncio.sleep(0.05)

    try:
        asyncio.run(park())
        [dead] = json_lines(invoke("dlq", "list", "--json", "--store", url).stdout)
        assert dead["group"] == "courier.book_pickup@bus"
        retried = invoke("dlq", "retry", str(dead["id"]), "--app", "courier:make", "--store", url)
        assert retried.exit_code == 1
        assert "came from the bus" in retried.stderr and "does not run" not in retried.stderr
        assert json_lines(invoke("dlq", "list", "--json", "--store", url).stdout) == [dead]
    finally:
        sys.modules.pop("courier", None)
