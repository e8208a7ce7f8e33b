"""A request that runs too long ends cleanly (408), a failing engine step fails only its own
requests with a 500 that says so, and the server goes on serving either way."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.server.test_chat_parsing import user


def _idle(client: Any) -> bool:
    engine = client.app.state.ctx.engine
    blocks = engine.engine.block_manager
    return engine.num_unfinished == 0 and blocks.num_free_blocks == blocks.num_blocks


def _wait_idle(client: Any) -> None:
    deadline = time.monotonic() + 10
    while not _idle(client):
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.02)


def test_request_timeout_ends_the_request(server_client: Any) -> None:
    client = server_client("glm-4.6v-flash", request_timeout=0.5)
    engine = client.app.state.ctx.engine
    engine.step_hook = lambda: time.sleep(0.01)  # 3000 tokens would take 30 s
    body = {"messages": user("Go on."), "max_tokens": 3000, "ignore_eos": True}
    whole = client.post("/v1/chat/completions", json=body)
    assert whole.status_code == 408 and "--request-timeout" in whole.json()["error"]["message"]
    _wait_idle(client)
    stream = client.post("/v1/chat/completions", json={**body, "stream": True})
    events = [line[6:] for line in stream.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 408 and "--request-timeout" in error["message"]
    _wait_idle(client)
    # The other streaming routes end the same way.
    for path, extra in (("/v1/completions", {"prompt": "Go on."}),
                        ("/generate", {"prompt": "Go on."})):
        streamed = client.post(path, json={"max_tokens": 3000, "ignore_eos": True,
                                           "stream": True, **extra})
        datas = [line[6:] for line in streamed.text.split("\n") if line.startswith("data: ")]
        errors = [json.loads(d)["error"] for d in datas if d != "[DONE]" and "error" in d]
        assert errors and errors[-1]["code"] == 408, (path, datas[-3:])
        _wait_idle(client)
    engine.step_hook = None
    ok = client.post("/v1/chat/completions", json={**body, "max_tokens": 2})
    assert ok.status_code == 200


def test_a_failing_step_is_a_500_for_its_requests_only(server_client: Any) -> None:
    client = server_client("glm-4.6v-flash")
    engine = client.app.state.ctx.engine
    calls = [0]

    def fault() -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("injected fault")

    engine.step_hook = fault
    body = {"messages": user("Hi"), "max_tokens": 5, "ignore_eos": True}
    failed = client.post("/v1/chat/completions", json=body)
    assert failed.status_code == 500
    message = failed.json()["error"]["message"]
    assert "engine step failed" in message and "injected fault" in message
    _wait_idle(client)
    after = client.post("/v1/chat/completions", json=body)
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 5
    metrics = client.get("/metrics").text
    assert "glmv_engine_step_failures_total 1.0" in metrics


def test_a_stream_left_during_a_send_is_closed_at_once() -> None:
    # Regression: Starlette stops a stream whose client left but does not close it; caught
    # waiting in `send` (as it often is under the HTTP middleware), the generator stayed
    # suspended with its engine request in flight until the garbage collector came by
    # (seen as glmv_num_requests_in_flight stuck at 1 for ~90 s after a load test).
    import asyncio

    from glmv.server.context import EventStreamResponse

    closed: list[bool] = []

    async def events() -> Any:
        try:
            for i in range(100):
                yield f"data: {i}\n\n"
        finally:
            closed.append(True)

    async def main() -> list[bool]:
        sent = asyncio.Event()

        async def receive() -> dict[str, str]:
            await sent.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                sent.set()
                await asyncio.Event().wait()  # the client stopped reading, then left

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        await asyncio.wait_for(EventStreamResponse(events())(scope, receive, send), 5)
        return list(closed)  # before asyncio.run's own clean-up of leftover generators

    assert asyncio.run(main()) == [True]
