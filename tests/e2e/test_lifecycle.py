"""The server process: it starts on the flags vLLM scripts use, refuses bad flags before
loading, and a SIGTERM ends it with status 0 once it has shut down."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import start_server, stop_server


def test_sigterm_is_a_clean_exit(tiny_checkpoint: Any, tmp_path: Path) -> None:
    server = start_server(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "serve.log", [])
    reply = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                       timeout=60)
    assert reply.status_code == 200
    assert stop_server(server) == 0
    log = (tmp_path / "serve.log").read_text()
    assert "Application shutdown complete" in log and "Traceback" not in log


def test_bad_flags_fail_fast_with_one_line(tiny_checkpoint: Any) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "glmv", "serve", str(tiny_checkpoint("glm-4.6v-flash")),
         "--limit-mm-per-prompt", '{"audio": 1}'], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--limit-mm-per-prompt" in result.stderr and "Traceback" not in result.stderr
