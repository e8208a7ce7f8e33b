"""Schemathesis against glmv's own OpenAPI schema: a real `glmv serve`, every operation, with
and without an API key. No request may get a 5xx (nor a 5xx error event inside a 200 stream),
none may take longer than RESPONSE_LIMIT_S, and the server must be healthy afterwards: /health
200, a plain chat completion works, nothing is left running or holding KV blocks, no traceback
in its log.

Cases are generated first (schemathesis' strategies under a derandomized hypothesis, so every
run sends the same requests), then sent by WORKERS threads at once: the engine batches the
generations, which keeps a few thousand requests within about two minutes on two cores.

Three runs, each printing a one-line summary (see it with `pytest -rP`):

* keyed: a server started with --api-key, every request sends the key (Bearer or X-API-Key);
* keyed, no key: the same server, no key or a wrong one: 401 everywhere but /health (the
  chat page at / and /static/ are not in the schema and are checked by hand);
* open: a server without a key, on another variant (GLM-4.1V: answer tags, no tools).

At the default GLMV_FUZZ_EXAMPLES=100 (cases per operation and generation mode) that is 804
requests with the key, 1,608 without it and 804 to the open server. The servers get a small
--max-model-len, so no fuzzed max_tokens makes a long request, and --request-timeout /
--mm-per-request-timeout, so a slow one ends with a 408 / 400 in time. A bigger run, by hand:

    GLMV_FUZZ_EXAMPLES=1000 pytest -rP -p no:cacheprovider tests/reliability/test_fuzz_api.py
"""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import string
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import max_response_time, not_a_server_error

from tests.e2e.conftest import Server, stop_server

pytestmark = pytest.mark.slow

#: Cases per operation and generation mode (positive, negative); several thousand requests in
#: all at the default. Operations without inputs (GET /health ...) have only one positive case.
EXAMPLES = int(os.environ.get("GLMV_FUZZ_EXAMPLES", "100"))
#: Requests in flight at once.
WORKERS = int(os.environ.get("GLMV_FUZZ_WORKERS", "4"))
#: No response may take longer (the servers end requests after REQUEST_TIMEOUT_S themselves).
RESPONSE_LIMIT_S = 30.0
REQUEST_TIMEOUT_S = 10
KEY = "fuzz-key-7d1e0c"
SERVER_FLAGS = (
    "--max-model-len", "256", "--request-timeout", str(REQUEST_TIMEOUT_S),
    "--mm-per-request-timeout", str(REQUEST_TIMEOUT_S), "--media-fetch-timeout", "2",
    # Fuzzed media URLs never leave the machine.
    "--allowed-media-domains", "media.invalid",
)
#: Hypothesis: the same cases every run; health checks that measure generation do not apply.
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
    phases=(Phase.explicit, Phase.generate), print_blob=False,
    suppress_health_check=(HealthCheck.too_slow, HealthCheck.filter_too_much,
                           HealthCheck.data_too_large, HealthCheck.large_base_example))
_PRINTABLE = string.digits + string.ascii_letters + string.punctuation


def key_headers(index: int) -> dict[str, str]:
    """The key, sent either way the server accepts it."""
    return {"Authorization": f"Bearer {KEY}"} if index % 2 else {"X-API-Key": KEY}


def wrong_headers(index: int) -> dict[str, str]:
    """What a client without the key might send: nothing, a wrong key, junk, the key where it
    does not count (the same ones every run)."""
    rng = random.Random(index)
    junk = "".join(rng.choice(_PRINTABLE) for _ in range(rng.randint(1, 40)))
    choices = [{}, {"Authorization": f"Bearer {junk}"}, {"X-API-Key": junk},
               {"Authorization": junk}, {"Authorization": f"Basic {KEY}"},
               {"Authorization": f"Bearer {KEY}x"}, {"X-API-Key": KEY[:-1]},
               {"Authorization": "Bearer", "X-API-Key": junk}]
    return choices[index % len(choices)]


@dataclass
class FuzzResult:
    """What one run sent and got back."""

    name: str
    sent: int = 0
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    server_errors: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    slowest: tuple[float, str] = (0.0, "")  # seconds, operation -> status

    def summary(self) -> str:
        histogram = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (f"fuzz {self.name}: {self.sent} requests, {self.server_errors} 5xx, "
                f"{len(self.failures)} failures, in {self.seconds:.0f} s (slowest "
                f"{self.slowest[0]:.1f} s, {self.slowest[1]}); statuses {{{histogram}}}")


@functools.lru_cache(maxsize=2)
def generate_cases(raw_schema: str) -> list[Any]:
    """Cases for every operation, positive then negative, in a fixed order (cached: each
    test of a worker reuses them)."""
    config = schemathesis.Config.from_dict({
        "checks": {"max_response_time": RESPONSE_LIMIT_S},
        # Streams are read to their end (schemathesis stops after 20 events by default), within
        # RESPONSE_LIMIT_S; a failed request is a failure, never retried.
        "max-stream-events": 1_000_000, "request-retries": 0})
    schema = schemathesis.openapi.from_dict(json.loads(raw_schema), config=config)
    cases: list[Any] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        has_inputs = len(operation.body) > 0 or any(True for _ in operation.iter_parameters())
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if has_inputs else [])
        for mode in modes:

            @FUZZ_SETTINGS
            @given(operation.as_strategy(generation_mode=mode))
            def collect(case: Any) -> None:
                cases.append(case)

            collect()
    return cases


def schema_cases(server: Server, headers: dict[str, str]) -> list[Any]:
    """The generated cases of the running server's /openapi.json."""
    reply = httpx.get(server.url + "/openapi.json", headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    return generate_cases(reply.text)


def _sse_server_errors(response: schemathesis.Response) -> list[str]:
    """Error events with a 5xx code inside a stream (its status is 200 by then)."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return []
    errors = []
    for line in response.text_lossy().splitlines():
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        error = event.get("error") if isinstance(event, dict) else None
        if isinstance(error, dict) and int(error.get("code") or 0) >= 500:
            errors.append(str(error.get("message")))
    return errors


def fuzz(name: str, server: Server, cases: list[tuple[Any, dict[str, str]]],
         expect: Callable[[Any], int | None] = lambda case: None) -> FuzzResult:
    """Send every (case, headers) (WORKERS at a time); `expect(case)` is the one status a case
    must get, or None for any that is not a 5xx."""
    result = FuzzResult(name)
    lock = threading.Lock()
    local = threading.local()
    hung = threading.Event()  # a request got no answer: stop there, not after every case

    def send(item: tuple[Any, dict[str, str]]) -> None:
        case, headers = item
        if hung.is_set():
            return
        if not hasattr(local, "session"):
            local.session = requests.Session()
        problems: list[str] = []
        started = time.monotonic()
        try:
            response = case.call(base_url=server.url, session=local.session, headers=headers,
                                 timeout=RESPONSE_LIMIT_S)
        except requests.RequestException as exc:  # a hang (read timeout) or a dead server
            hung.set()
            with lock:
                result.sent += 1
                result.statuses[0] += 1
                result.failures.append(f"{case.operation.label}: no response "
                                       f"({type(exc).__name__}: {exc})\n"
                                       f"{case.as_curl_command(headers)}")
            return
        elapsed = time.monotonic() - started
        status = response.status_code
        try:
            case.validate_response(response, checks=[not_a_server_error, max_response_time],
                                   headers=headers)
        except AssertionError as exc:  # schemathesis' FailureGroup
            problems.append(str(exc).strip())
        stream_errors = _sse_server_errors(response) if status == 200 else []
        problems += [f"5xx error event in a stream: {message}" for message in stream_errors]
        if elapsed > RESPONSE_LIMIT_S or response.stream_cut_short:
            problems.append(f"the response took {elapsed:.1f} s (stream cut short: "
                            f"{response.stream_cut_short})")
        wanted = expect(case)
        if wanted is not None and status != wanted:
            problems.append(f"status {status}, expected {wanted}")
        with lock:
            result.sent += 1
            result.statuses[status] += 1
            result.server_errors += status >= 500 or bool(stream_errors)
            result.slowest = max(result.slowest, (elapsed, f"{case.operation.label} {status}"))
            if problems:
                result.failures.append(f"{case.operation.label} -> {status}: "
                                       + "; ".join(problems)
                                       + f"\n{response.text_lossy()[:500]}\n"
                                       + case.as_curl_command(headers))

    started = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(send, cases))
    result.seconds = time.monotonic() - started
    print(result.summary())
    return result


def assert_clean(result: FuzzResult) -> None:
    assert not result.failures, (f"{len(result.failures)} failures, e.g.:\n\n"
                                 + "\n\n".join(result.failures[:5]) + "\n\n" + result.summary())


def assert_healthy(server: Server, headers: dict[str, str]) -> None:
    """/health, a normal chat completion, nothing left running or holding KV blocks, and no
    unexpected exception in the log."""
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    reply = httpx.post(server.api + "/chat/completions", headers=headers, timeout=60, json={
        "messages": [{"role": "user", "content": "Still there?"}], "max_tokens": 4,
        "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] in ("length", "stop")
    deadline = time.monotonic() + 15  # aborted requests are released by the engine thread
    while time.monotonic() < deadline and (
            server.metric("glmv_num_requests_running", headers) != 0
            or server.metric("glmv_kv_cache_blocks_used", headers) != 0):
        time.sleep(0.2)
    assert server.metric("glmv_num_requests_running", headers) == 0
    assert server.metric("glmv_kv_cache_blocks_used", headers) == 0
    assert server.metric("glmv_num_requests_waiting", headers) == 0
    assert server.process.poll() is None
    log = server.log.read_text(errors="replace")
    assert "Traceback" not in log, log[-6000:]


# ------------------------------------------------------------------------------------ tests


@pytest.fixture
def keyed_server(serve: Callable[..., Server]) -> Iterator[Server]:
    server = serve("glm-4.6v-flash", "--api-key", KEY, *SERVER_FLAGS)
    yield server
    stop_server(server)


@pytest.fixture
def open_server(serve: Callable[..., Server]) -> Iterator[Server]:
    # Request chat templates allowed here, so that fuzzed templates reach the sandbox.
    server = serve("glm-4.1v-thinking", "--trust-request-chat-template", *SERVER_FLAGS)
    yield server
    stop_server(server)


def test_fuzz_with_and_without_the_key(keyed_server: Server) -> None:
    server = keyed_server
    headers = key_headers(0)
    cases = schema_cases(server, headers)
    with_key = fuzz("keyed server, with the key", server,
                    [(case, key_headers(i)) for i, case in enumerate(cases)])
    # Without it, each case twice: nothing but /health answers anything else than 401.
    without_key = fuzz("keyed server, without the key", server,
                       [(case, wrong_headers(i)) for i, case in enumerate(cases + cases)],
                       lambda case: 200 if case.operation.path == "/health" else 401)
    for path in ("/", "/static/app.js", "/static/style.css"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path
    for path in ("/openapi.json", "/docs", "/v1/nothing-here"):
        assert httpx.get(server.url + path, timeout=10).status_code == 401, path
    assert_clean(with_key)
    assert_clean(without_key)
    assert with_key.sent >= 8 * EXAMPLES and without_key.sent == 2 * with_key.sent
    assert with_key.statuses[200] > EXAMPLES // 4  # not everything was refused
    assert_healthy(server, headers)


def test_fuzz_open_server(open_server: Server) -> None:
    server = open_server
    cases = schema_cases(server, {})
    result = fuzz("open server (GLM-4.1V)", server, [(case, {}) for case in cases])
    assert_clean(result)
    assert result.sent >= 8 * EXAMPLES
    assert result.statuses[200] > EXAMPLES // 4
    assert_healthy(server, {})
