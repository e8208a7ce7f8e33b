"""API keys, capacity refusals and Prometheus metrics of the server."""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

import numpy as np
import PIL.Image
import pytest

from tests.server.test_chat_parsing import png_data_url, user

KEY = "sk-test-4f1c0e9a"


def test_api_key_guards_everything_but_health(server_client: Any,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    client = server_client("glm-4.6v-flash", api_keys=("other-key", KEY))
    assert client.get("/health").status_code == 200
    body = {"messages": user("hi"), "max_tokens": 2}
    for path, method, payload in (("/v1/models", "get", None), ("/metrics", "get", None),
                                  ("/version", "get", None),
                                  ("/v1/chat/completions", "post", body),
                                  ("/v1/completions", "post", {"prompt": "x"}),
                                  ("/tokenize", "post", {"prompt": "x"}),
                                  ("/generate", "post", {"prompt": "x"})):
        call = getattr(client, method)
        kwargs = {"json": payload} if payload is not None else {}
        refused = call(path, **kwargs)
        assert refused.status_code == 401, path
        assert refused.json()["error"]["type"] == "authentication_error"
        assert call(path, headers={"Authorization": "Bearer wrong"}, **kwargs).status_code == 401
        ok = call(path, headers={"Authorization": f"Bearer {KEY}"}, **kwargs)
        assert ok.status_code == 200, (path, ok.text)
    assert client.get("/v1/models", headers={"Authorization": "Bearer other-key"}).status_code \
        == 200
    metrics = client.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert KEY not in metrics and "other-key" not in metrics
    assert KEY not in caplog.text


def test_full_server_answers_503_before_any_work(server_client: Any) -> None:
    client = server_client("glm-4.6v-flash", max_queue_len=1)
    engine = client.app.state.ctx.engine
    engine._num_pending = 1  # as if one request were in flight
    try:
        response = client.post("/v1/chat/completions", json={"messages": user("hi")})
    finally:
        engine._num_pending = 0
    assert response.status_code == 503
    assert "--max-queue-len" in response.json()["error"]["message"]
    assert client.post("/v1/chat/completions",
                       json={"messages": user("hi"), "max_tokens": 1}).status_code == 200


def test_media_errors_are_4xx_and_the_server_goes_on(server_client: Any) -> None:
    client = server_client("glm-4.6v-flash", max_bytes=2000)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(noise).save(buf, format="PNG")  # ~12 kB: noise does not compress
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    big = client.post("/v1/chat/completions", json={"messages": user("x", url), "max_tokens": 1})
    assert big.status_code == 413 and "--max-media-bytes" in big.json()["error"]["message"]
    assert big.json()["error"]["type"] == "request_too_large"
    broken = client.post("/v1/chat/completions", json={
        "messages": user("x", "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="),
        "max_tokens": 1})
    assert broken.status_code == 400
    outside = client.post("/v1/chat/completions",
                          json={"messages": user("x", "file:///etc/hostname"), "max_tokens": 1})
    assert outside.status_code == 400
    assert "--allowed-local-media-path" in outside.json()["error"]["message"]
    assert client.post("/v1/chat/completions",
                       json={"messages": user("ok"), "max_tokens": 1}).status_code == 200


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith("#")]
    assert values, f"{name} not in /metrics"
    return sum(values)


def test_metrics_count_requests_tokens_and_latency(server_client: Any) -> None:
    client = server_client("glm-4.6v")
    body = {"messages": user("look", png_data_url(56, 56)), "max_tokens": 5,
            "temperature": 0, "ignore_eos": True}
    usage = client.post("/v1/chat/completions", json=body).json()["usage"]
    client.post("/v1/chat/completions", json=body)  # prefix-cache hit: no encoder run at all
    # The same picture after a different text: the prefix differs, the encoder output is reused.
    other = {**body, "messages": [{"role": "system", "content": "Be brief. " * 8},
                                  *body["messages"]]}
    usage_other = client.post("/v1/chat/completions", json=other).json()["usage"]
    client.post("/v1/chat/completions", json={"messages": user("x"), "model": "nope"})
    text = client.get("/metrics").text
    assert _metric(text, "glmv_prompt_tokens_total") == 2 * usage["prompt_tokens"] + \
        usage_other["prompt_tokens"]
    assert _metric(text, 'glmv_visual_tokens_total{modality="image"}') == 3 * usage[
        "prompt_tokens_details"]["image_tokens"]
    assert _metric(text, "glmv_generation_tokens_total") == 15
    assert _metric(text, 'glmv_requests_finished_total{reason="length"}') == 3
    assert _metric(text, "glmv_time_to_first_token_seconds_count") == 3
    assert _metric(text, "glmv_time_per_output_token_seconds_count") == 3
    assert _metric(text, "glmv_media_processing_seconds_count") == 3
    assert _metric(text, 'glmv_http_requests_total{path="/v1/chat/completions",status="200"}') \
        == 3
    assert _metric(text, 'glmv_http_requests_total{path="/v1/chat/completions",status="404"}') \
        == 1
    assert _metric(text, "glmv_encoder_cache_hits_total") == 1
    assert _metric(text, "glmv_encoder_cache_misses_total") == 1
    assert _metric(text, "glmv_cached_prompt_tokens_total") > 0
    assert _metric(text, "glmv_kv_cache_blocks_total") > 0
    for gauge in ("glmv_num_requests_running", "glmv_num_requests_waiting",
                  "glmv_kv_cache_blocks_used", "glmv_num_requests_in_flight"):
        assert _metric(text, gauge) == 0, gauge


def test_metrics_count_every_endpoint_streamed_or_not(server_client: Any) -> None:
    client = server_client("glm-4.6v")
    greedy = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    for stream in (False, True):
        client.post("/v1/chat/completions", json={"messages": user("hi"), "stream": stream,
                                                  **greedy})
        client.post("/v1/completions", json={"prompt": ["a", "b"], "stream": stream, **greedy})
        client.post("/generate", json={"prompt": "c", "stream": stream, **greedy})
    text = client.get("/metrics").text
    finished = 2 * (1 + 2 + 1)
    assert _metric(text, 'glmv_requests_finished_total{reason="length"}') == finished
    assert _metric(text, "glmv_generation_tokens_total") == 4 * finished
    assert _metric(text, "glmv_time_to_first_token_seconds_count") == finished
    assert _metric(text, "glmv_time_per_output_token_seconds_count") == finished
    assert _metric(text, "glmv_e2e_request_latency_seconds_count") == finished
    # Each request's first token comes after its arrival and before its end.
    ttft = _metric(text, "glmv_time_to_first_token_seconds_sum")
    assert 0 < ttft < _metric(text, "glmv_e2e_request_latency_seconds_sum")


def test_oversized_bodies_are_413_before_parsing(server_client: Any) -> None:
    client = server_client("glm-4.6v-flash", max_request_bytes=4096)
    small = {"messages": user("hi"), "max_tokens": 1}
    assert client.post("/v1/chat/completions", json=small).status_code == 200
    big = {"messages": user("x" * 5000), "max_tokens": 1}
    refused = client.post("/v1/chat/completions", json=big)
    assert refused.status_code == 413
    assert "--max-request-bytes" in refused.json()["error"]["message"]

    def chunks(total: int) -> Any:  # no Content-Length: the body is counted as it arrives
        yield b'{"prompt": "'
        for _ in range(total // 1000):
            yield b"y" * 1000
        yield b'", "max_tokens": 1}'

    chunked = client.post("/v1/completions", content=chunks(8000),
                          headers={"content-type": "application/json"})
    assert chunked.status_code == 413, chunked.text
    assert "more than 4,096 bytes" in chunked.json()["error"]["message"]
    fits = client.post("/v1/completions", content=chunks(2000),
                       headers={"content-type": "application/json"})
    assert fits.status_code == 200, fits.text
    assert client.get("/health").status_code == 200
