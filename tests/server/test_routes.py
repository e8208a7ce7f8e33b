"""The OpenAI-compatible routes over the real engine (tiny random model): response shapes,
sampling fields, usage that counts the real prompt, streams that equal whole responses,
/v1/completions, /tokenize, MindIE's /generate, /v1/models, /health, /version."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from tests.server.conftest import start_client
from tests.server.test_chat_parsing import png_data_url, stream_events, user

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def client(tiny_checkpoint: Any) -> Iterator[Any]:
    # One server for the module: the routes do not change its state beyond caches.
    with ExitStack() as stack:
        yield start_client(stack, tiny_checkpoint, "glm-4.6v",
                           served_model_names=("glm-tiny", "alias"),
                           trust_request_chat_template=True)


def chat(client: Any, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_health_version(client: Any) -> None:
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["glm-tiny", "alias"]
    assert models["data"][0]["max_model_len"] == 2048
    info = models["data"][0]["glmv"]
    assert (info["model_type"], info["thinking"], info["tools"]) == ("glm4v_moe", "hybrid", True)
    assert info["limit_mm_per_prompt"] == {"image": 32, "video": 4, "document": 4}
    assert info["max_media_bytes"] == 64 * 1024**2
    assert client.get("/health").status_code == 200
    assert client.get("/version").json()["version"]


def test_chat_response_shape_and_usage(client: Any) -> None:
    body = {"messages": user("Describe.", png_data_url(56, 84)), "max_tokens": 6, **GREEDY}
    result = chat(client, model="alias", **body)
    assert result["object"] == "chat.completion" and result["model"] == "alias"
    assert result["id"].startswith("chatcmpl-")
    [choice] = result["choices"]
    assert choice["finish_reason"] == "length"
    assert set(choice["message"]) >= {"role", "content", "reasoning_content", "tool_calls"}
    usage = result["usage"]
    counted = client.post("/tokenize", json={"messages": body["messages"]}).json()
    assert usage["prompt_tokens"] == counted["count"]
    assert usage["prompt_tokens_details"]["image_tokens"] == counted["image_tokens"] > 0
    assert usage["completion_tokens"] == 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + 6
    # The same picture again: the prompt prefix is served from the cache.
    again = chat(client, **body)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["choices"][0]["message"] == choice["message"]


def test_stream_equals_the_whole_response(client: Any) -> None:
    body = {"messages": user("Tell me."), "max_tokens": 12, **GREEDY,
            "stream_options": {"include_usage": True}}
    whole = chat(client, **body)
    events = stream_events(client, body)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    content = reasoning = ""
    for event in events[:-1]:
        assert event["object"] == "chat.completion.chunk" and event["usage"] is None
        for choice in event["choices"]:
            content += choice["delta"].get("content") or ""
            reasoning += choice["delta"].get("reasoning_content") or ""
    message = whole["choices"][0]["message"]
    assert content == (message["content"] or "")
    assert reasoning == (message["reasoning_content"] or "")
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


def test_sampling_fields(client: Any) -> None:
    base = {"messages": user("Pick."), "max_tokens": 8, "ignore_eos": True}
    seeded = {**base, "temperature": 1.0, "seed": 7, "n": 2}
    first, second = chat(client, **seeded), chat(client, **seeded)
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in second["choices"]]
    assert first["usage"]["completion_tokens"] == 16
    # vLLM / MindIE extras at the top level of the body are accepted and applied.
    extras = chat(client, **base, top_k=1, min_p=0.1, repetition_penalty=1.2, do_sample=False,
                  skip_special_tokens=True)
    assert extras["usage"]["completion_tokens"] == 8
    limited = chat(client, **{**base, "max_tokens": None}, max_completion_tokens=3)
    assert limited["usage"]["completion_tokens"] == 3


def test_stop_strings_and_logprobs(client: Any) -> None:
    base = {"messages": user("Say."), "max_tokens": 10, **GREEDY, "skip_special_tokens": False}
    free = chat(client, **base, logprobs=True, top_logprobs=3)
    choice = free["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == 10
    for entry in entries:
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] <= 0
        assert entry["top_logprobs"][0]["logprob"] >= entry["logprob"] - 1e-6  # greedy
    raw = "".join(e["token"] for e in entries)
    stop = raw[5:8]
    if stop.strip():
        cut = chat(client, **base, stop=[stop])["choices"][0]
        assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop


def test_invalid_fields_are_400_or_422(client: Any) -> None:
    bad = client.post("/v1/chat/completions", json={"messages": user("x"), "temperature": -1})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    missing = client.post("/v1/chat/completions", json={"model": "glm-tiny"})
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "messages"
    unknown = client.post("/v1/chat/completions", json={"messages": user("x"), "model": "gpt"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    orphan = client.post("/v1/chat/completions", json={"messages": user("x"),
                                                       "top_logprobs": 2})
    assert orphan.status_code == 400


def test_completions(client: Any) -> None:
    body = {"prompt": ["Once upon", "A cat"], "max_tokens": 5, **GREEDY, "logprobs": 2,
            "echo": True}
    result = client.post("/v1/completions", json=body).json()
    assert result["object"] == "text_completion"
    assert [c["index"] for c in result["choices"]] == [0, 1]
    assert result["choices"][0]["text"].startswith("Once upon")
    assert len(result["choices"][1]["logprobs"]["tokens"]) == 5
    assert result["usage"]["completion_tokens"] == 10
    ids = client.post("/tokenize", json={"prompt": "Once upon"}).json()["tokens"]
    by_ids = client.post("/v1/completions", json={**body, "prompt": ids, "echo": False}).json()
    plain = client.post("/v1/completions", json={**body, "prompt": "Once upon",
                                                 "echo": False}).json()
    assert by_ids["choices"][0]["text"] == plain["choices"][0]["text"]
    streamed = client.post("/v1/completions", json={**body, "prompt": "Once upon",
                                                    "echo": False, "stream": True}).text
    chunks = [json.loads(x[6:]) for x in streamed.split("\n")
              if x.startswith("data: ") and x != "data: [DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]


def test_mindie_generate(client: Any) -> None:
    flat = client.post("/generate", json={"prompt": "Hello", "max_tokens": 4, **GREEDY}).json()
    tgi = client.post("/generate", json={"inputs": "Hello", "parameters": {
        "max_new_tokens": 4, "do_sample": False}}).json()
    completion = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4,
                                                      **GREEDY}).json()
    assert flat["text"] == [completion["choices"][0]["text"]]
    assert tgi["details"]["generated_tokens"] <= 4
    multimodal = client.post("/generate", json={"prompt": [
        {"type": "image_url", "image_url": png_data_url(32, 32)},
        {"type": "text", "text": "What is it?"}], "max_tokens": 3, **GREEDY})
    assert multimodal.status_code == 200, multimodal.text


def test_tokenize_matches_what_the_engine_gets(client: Any) -> None:
    from tests.server.test_chat_parsing import WEATHER, engine_of

    messages = user("Weather?", png_data_url(64, 64))
    body = {"messages": messages, "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    counted = client.post("/tokenize", json=body).json()
    engine = engine_of(client)
    prompt = engine.processor.process_chat(
        messages, tools=[WEATHER],
        assistant_prefill="<think></think>\n<tool_call>get_weather\n")
    assert counted["tokens"] == prompt.token_ids
    assert counted["image_tokens"] == prompt.num_image_tokens


def test_empty_message_lists_are_422_everywhere(client: Any) -> None:
    # Found by fuzzing: /tokenize with "messages": [] once answered 500.
    for path in ("/tokenize", "/v1/chat/completions"):
        response = client.post(path, json={"messages": []})
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["param"] == "messages"


def test_hostile_numbers_are_400_or_served(client: Any) -> None:
    # Found by fuzzing (tests/reliability/test_fuzz_api.py): token ids past int64 answered
    # 500, a 10 MB prompt held the server for a minute while it was tokenized, n = 10**9
    # stalled the engine thread for every request, and a top_p that is 0 in float32 failed the
    # engine step (500).
    for ids in ([[5, 2**70]], [7, -1], [10**9]):
        bad = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1})
        assert bad.status_code == 400, (ids, bad.text)
        assert "outside the vocabulary" in bad.json()["error"]["message"]
    long = client.post("/v1/completions", json={"prompt": "x" * 10**7, "max_tokens": 1})
    assert long.status_code == 400 and "10,000,000 characters" in long.text
    many = client.post("/v1/completions", json={"prompt": "Hi", "n": 10**9, "max_tokens": 1})
    assert many.status_code == 400 and "n must be at most 128" in many.text
    for top_p in (1e-320, 1e-46):
        tiny = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3,
                                                    "temperature": 1.0, "top_p": top_p,
                                                    "ignore_eos": True})
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("extra", [
    {"tools": [{}], "tool_choice": {"type": "function", "function": "x"}},
    {"tools": [{"function": [1]}], "tool_choice": {"function": {"name": "a"}}},
    {"tools": [{"function": {"name": 5}}], "tool_choice": {"function": {"name": 5}}},
    {"chat_template_kwargs": {"tools": 1}},
    {"chat_template_kwargs": {"messages": [], "source": "x"}},
    {"chat_template_kwargs": {"add_generation_prompt": False}},
    {"chat_template": "{% for i in range(10**8) %}x{% endfor %}"},
    {"chat_template": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"},
    {"chat_template": "{{ 1 / 0 }}"},
    {"chat_template": "{{ 'x' * 10**9 }}"},
    {"chat_template": "{% set n = 10**8 %}{{ 10 ** n }}"},
    {"chat_template": "{{ 'xy' * 400000 }}"},
], ids=["choice-function-not-object", "tool-function-not-object", "non-string-name",
        "kwargs-tools", "kwargs-messages-source", "kwargs-generation-prompt", "huge-range",
        "recursion", "division-by-zero", "huge-string", "huge-power", "longer-than-fits"])
def test_odd_tools_and_templates_are_400(client: Any, extra: dict[str, Any]) -> None:
    # Found by fuzzing: each of these answered 500 (AttributeError, TypeError, OverflowError,
    # RecursionError), or held the whole server for minutes (a 1 GB string, a 100-million-digit
    # power, a 10 MB prompt being tokenized).
    response = client.post("/v1/chat/completions", json={"messages": user("x"),
                                                         "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text


def test_request_templates_need_the_trust_flag(server_client: Any) -> None:
    untrusting = server_client("glm-4.6v-flash")
    body = {"messages": user("x"), "max_tokens": 1, "chat_template": "{{ messages[0].content }}"}
    refused = untrusting.post("/v1/chat/completions", json=body)
    assert refused.status_code == 400
    assert "--trust-request-chat-template" in refused.json()["error"]["message"]
    counted = untrusting.post("/tokenize", json={"messages": user("x"), "chat_template": "x"})
    assert counted.status_code == 400
    body.pop("chat_template")
    assert untrusting.post("/v1/chat/completions", json=body).status_code == 200
