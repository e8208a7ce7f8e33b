"""The server process: it refuses bad flags before loading, and a SIGTERM lets in-flight
requests finish, then ends it with status 0; past --shutdown-timeout the requests left are
ended (503, in-band for streams) and requests arriving during the drain are refused."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import Server, start_server, stop_server


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


def _stream_in_background(server: Server, max_tokens: int) -> tuple[threading.Thread,
                                                                     list[str]]:
    """A long streamed chat read by a thread; returns once its first event has come: the
    thread and the list its `data:` payloads go into."""
    body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": max_tokens,
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
    return reader, events


def test_sigterm_finishes_in_flight_streams_first(tiny_checkpoint: Any, tmp_path: Path) -> None:
    server = start_server(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "serve.log", [])
    reader, events = _stream_in_background(server, max_tokens=1500)
    server.process.send_signal(signal.SIGTERM)
    reader.join(120)
    assert server.process.wait(60) == 0
    assert events[-1] == "[DONE]"
    finals = [json.loads(e) for e in events[:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    deltas = [e["choices"][0]["delta"] for e in finals if e["choices"]]
    text_chunks = sum(1 for d in deltas if d.get("content") or d.get("reasoning_content"))
    assert text_chunks > 100  # the whole reply, not cut at the signal


def _read_http(sock: socket.socket, timeout: float, until: bytes | None = None) -> bytes:
    """Bytes until `until` has arrived, or else until the server closes the connection."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (until is None or until not in data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_shutdown_timeout_ends_what_is_left_and_refuses_newcomers(tiny_checkpoint: Any,
                                                                   tmp_path: Path) -> None:
    drain = 2.0
    log = tmp_path / "serve.log"
    server = start_server(tiny_checkpoint("glm-4.6v-flash"), log,
                          ["--shutdown-timeout", f"{drain:g}"])
    port = int(server.url.rsplit(":", 1)[1])
    # Long enough to outlast the drain by far (~3000 tokens at ~100-300 tokens/s).
    body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": 3000,
            "ignore_eos": True, "stream": True}
    events: list[tuple[float, str]] = []
    started = threading.Event()

    def consume() -> None:
        with httpx.stream("POST", server.api + "/chat/completions", json=body,
                          timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic(), line[6:]))
                    started.set()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    assert started.wait(60)
    # A request whose headers reach the server before the signal and its body after it: it
    # gets to the app during the drain, on a connection uvicorn keeps open, and is refused.
    payload = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    straggler = socket.create_connection(("127.0.0.1", port), timeout=10)
    straggler.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert _read_http(straggler, 10, until=b"\r\n\r\n").startswith(b"HTTP/1.1 200")
    straggler.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\n"
                      b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n")
    time.sleep(0.3)  # the server reads the headers: a request is under way on it
    signalled = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    # New requests during the drain are refused at once and never served: within ~0.1 s of
    # the signal nothing listens any more (connection refused); before that the app answers
    # 503 itself, or a connection accepted just as the listener closes is closed unanswered.
    refused = None
    while refused is None and time.monotonic() < signalled + 5:
        knocked = time.monotonic()
        try:
            late = httpx.post(server.api + "/completions", timeout=5,
                              json={"prompt": "Hi", "max_tokens": 2})
        except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError):
            refused = time.monotonic() - knocked
        else:
            assert late.status_code == 503 and "shutting down" in late.text, late.text
            time.sleep(0.05)
    assert refused is not None and refused < 1.0, "new connections were not refused"
    straggler.sendall(payload)
    answer = _read_http(straggler, 10)
    straggler.close()
    assert answer.startswith(b"HTTP/1.1 503"), answer[:300]
    assert b"shutting down" in answer
    # The in-flight stream ran on through the drain, then ended with a 503 event and [DONE].
    reader.join(drain + 20)
    assert not reader.is_alive(), "the stream did not end"
    status = server.process.wait(drain + 20)
    exited = time.monotonic() - signalled
    assert status == 0
    assert exited < drain + 8, f"exited {exited:.1f} s after SIGTERM"
    assert events[-1][1] == "[DONE]"
    error = json.loads(events[-2][1])["error"]
    assert error["code"] == 503 and "--shutdown-timeout" in error["message"]
    during = [t for t, _ in events if signalled + 1.0 < t < signalled + drain - 0.2]
    assert during, "the stream did not go on during the drain"
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "Application shutdown complete" in text
    print(f"\ndrain: stream ended {events[-1][0] - signalled:.2f} s and the process "
          f"{exited:.2f} s after SIGTERM (--shutdown-timeout {drain:g})")


def _children(pid: int) -> list[int]:
    """Child processes of `pid`, whichever of its threads started them."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        path = task / "children"
        if path.exists():
            children += [int(p) for p in path.read_text().split()]
    return children


def test_a_dead_worker_takes_the_server_down_with_a_clear_message(tiny_checkpoint: Any,
                                                                  tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    server = start_server(tiny_checkpoint("glm-4.1v-thinking"), log,
                          ["--tensor-parallel-size", "2"])
    try:
        reader, events = _stream_in_background(server, max_tokens=3000)
        workers = [pid for pid in _children(server.process.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert len(workers) == 1, "the server should have spawned one worker (rank 1)"
        os.kill(workers[0], signal.SIGKILL)
        reader.join(60)
        assert server.process.wait(60) == 1  # the server exits on its own, with a failure
    finally:
        stop_server(server)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert "error" in error and "rank 1" in error["error"]["message"], error
    text = log.read_text()
    assert "tensor-parallel worker rank 1" in text and f"status {-signal.SIGKILL}" in text
