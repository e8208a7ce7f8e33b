"""A real `glmv serve` process on 127.0.0.1 over a tiny checkpoint, for end-to-end tests.

`serve(variant, *flags)` starts `python -m glmv serve CKPT --port P ...` in its own process,
waits for /health and returns a `Server` (base URL, log, process); the process gets SIGTERM
at the end of the module. Media files the tests send by path live in `media_dir`, the
server's --allowed-local-media-path.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

_START_TIMEOUT_S = 180.0


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen[bytes]
    log: Path
    variant: str = ""  # the tiny checkpoint's variant, when known

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float:
        text = httpx.get(self.url + "/metrics", headers=headers or {}).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(name) and not line.startswith("#")]
        assert values, f"{name} not in /metrics"
        return sum(values)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(checkpoint: Path, log: Path, flags: list[str],
                 env: dict[str, str] | None = None) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "glmv", "serve", str(checkpoint), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--kv-cache-memory", "0.05",
           "--max-model-len", "4096", *flags]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"glmv serve exited with {process.returncode}:\n"
                               + log.read_text(errors="replace")[-4000:])
        try:
            if httpx.get(server.url + "/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError("glmv serve did not become healthy:\n"
                       + log.read_text(errors="replace")[-4000:])


def stop_server(server: Server, timeout: float = 30.0) -> int:
    """SIGTERM, then the exit status (killed if it does not stop in time)."""
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return int(server.process.returncode)


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def serve(tiny_checkpoint: Any, media_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(variant: str, *flags: str, env: dict[str, str] | None = None) -> Server:
        log = tmp_path_factory.mktemp("logs") / f"{variant}.log"
        server = start_server(tiny_checkpoint(variant), log,
                              ["--allowed-local-media-path", str(media_dir), *flags], env)
        servers.append(server)
        return server

    yield start
    for server in servers:
        stop_server(server)
