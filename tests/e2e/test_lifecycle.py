"""The server process: it refuses bad flags before loading, and a SIGTERM lets in-flight
requests finish, then ends it with status 0."""

from __future__ import annotations

import json
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


def test_sigterm_finishes_in_flight_streams_first(tiny_checkpoint: Any, tmp_path: Path) -> None:
    import signal
    import threading

    server = start_server(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "serve.log", [])
    body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 1500,
            "ignore_eos": True, "stream": True}
    events: list[str] = []
    started = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", server.api + "/chat/completions", json=body,
                          timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    started.set()

    reader = threading.Thread(target=consume)
    reader.start()
    assert started.wait(60)
    server.process.send_signal(signal.SIGTERM)
    reader.join(120)
    assert server.process.wait(60) == 0
    assert events[-1] == "[DONE]"
    finals = [json.loads(e) for e in events[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    deltas = [e["choices"][0]["delta"] for e in finals if e["choices"]]
    text_chunks = sum(1 for d in deltas if d.get("content") or d.get("reasoning_content"))
    assert text_chunks > 100  # the whole reply, not cut at the signal
