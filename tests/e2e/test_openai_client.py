"""`glmv serve` end to end: the official `openai` client against a real server process on
127.0.0.1, for a hybrid-thinking MoE checkpoint with tools (GLM-4.6V) and the thinking-only
GLM-4.1V. Text, images by data URL and by path, several images, a video, a PDF; streamed and
not; tools and tool_choice; thinking on and off; usage equal to the real prompt's tokens; a
client that disconnects mid-stream leaves nothing running."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import PIL.Image
import pytest

from tests.conftest import GLM45_LAYOUT, VARIANTS
from tests.e2e.conftest import Server
from tests.helpers import write_mp4

openai = pytest.importorskip("openai", reason="the official client is a test dependency")

MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def files(media_dir: Path) -> dict[str, Path]:
    pytest.importorskip("av")
    rng = np.random.default_rng(0)
    out = {}
    for name, size in (("cat.png", (120, 80)), ("dog.jpg", (64, 96))):
        path = media_dir / name
        PIL.Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(path)
        out[name] = path
    video = write_mp4(media_dir / "clip.mp4")
    out["clip.mp4"] = video
    return out


#: Every variant on one process, and split over two ranks (the server spawns the second):
#: a dense model, and a MoE one with expert parallel and the data-parallel vision encoder.
SERVERS = [(variant, ()) for variant in VARIANTS] + [
    ("glm-4.1v-thinking", ("--tensor-parallel-size", "2")),
    ("glm-4.6v", ("--tensor-parallel-size", "2", "--enable-expert-parallel",
                  "--mm-encoder-tp-mode", "data")),
]


@pytest.fixture(scope="module", params=SERVERS,
                ids=[v + ("-tp2" if flags else "") for v, flags in SERVERS])
def server(request: pytest.FixtureRequest, serve: Callable[..., Server]) -> Server:
    variant, parallel = request.param
    flags = ["--served-model-name", MODEL, *parallel]
    if variant in GLM45_LAYOUT:  # vLLM launch scripts pass these; they must be accepted
        flags += ["--reasoning-parser", "glm45", "--tool-call-parser", "glm45",
                  "--enable-auto-tool-choice"]
    server = serve(variant, *flags)
    server.variant = variant
    return server


def client(server: Server) -> Any:
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0)


def data_url(path: Path) -> str:
    mime = {"png": "image/png", "jpg": "image/jpeg", "mp4": "video/mp4"}[path.suffix[1:]]
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def tokenize(server: Server, **body: Any) -> dict[str, Any]:
    response = httpx.post(server.url + "/tokenize", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return dict(response.json())


GREEDY: dict[str, Any] = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_models(server: Server) -> None:
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_text_chat_whole_and_streamed(server: Server) -> None:
    messages = [{"role": "user", "content": "Write a haiku."}]
    whole = client(server).chat.completions.create(model=MODEL, messages=messages,
                                                   max_tokens=10, **GREEDY)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    assert whole.usage.prompt_tokens == tokenize(server, messages=messages)["count"]
    stream = client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, stream=True,
        stream_options={"include_usage": True}, **GREEDY)
    content, reasoning, usage = "", "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
    message = whole.choices[0].message
    assert content == (message.content or "")
    assert reasoning == (getattr(message, "reasoning_content", None) or "")
    assert usage is not None and usage.total_tokens == whole.usage.total_tokens


def test_images_by_data_url_and_path(server: Server, files: dict[str, Path]) -> None:
    one = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(files["cat.png"])}},
        {"type": "text", "text": "What is this?"}]}]
    by_path = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": files["cat.png"].as_uri()}},
        {"type": "text", "text": "What is this?"}]}]
    a = client(server).chat.completions.create(model=MODEL, messages=one, max_tokens=4,
                                               **GREEDY)
    b = client(server).chat.completions.create(model=MODEL, messages=by_path, max_tokens=4,
                                               **GREEDY)
    assert a.choices[0].message.content == b.choices[0].message.content
    counted = tokenize(server, messages=one)
    assert a.usage.prompt_tokens == counted["count"]
    details = a.usage.prompt_tokens_details.model_dump()
    assert details["image_tokens"] == counted["image_tokens"] > 0
    several = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": files["cat.png"].as_uri()}},
        {"type": "image_url", "image_url": {"url": data_url(files["dog.jpg"])}},
        {"type": "text", "text": "Compare."}]}]
    c = client(server).chat.completions.create(model=MODEL, messages=several, max_tokens=3,
                                               **GREEDY)
    assert c.usage.prompt_tokens_details.model_dump()["image_tokens"] == tokenize(
        server, messages=several)["image_tokens"] > counted["image_tokens"]


def test_video_by_path(server: Server, files: dict[str, Path]) -> None:
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": files["clip.mp4"].as_uri()}},
        {"type": "text", "text": "What happens?"}]}]
    result = client(server).chat.completions.create(model=MODEL, messages=messages,
                                                    max_tokens=3, **GREEDY)
    details = result.usage.prompt_tokens_details.model_dump()
    assert details["video_tokens"] == tokenize(server, messages=messages)["video_tokens"] > 0


def test_pdf_pages_become_images(server: Server) -> None:
    fitz = pytest.importorskip("pymupdf")
    doc = fitz.open()
    for n in range(2):
        page = doc.new_page(width=300, height=200)
        page.insert_text((40, 100), f"Page {n + 1}: quarterly figures")
    pdf = doc.tobytes()
    messages = [{"role": "user", "content": [
        {"type": "file", "file": {"filename": "report.pdf", "file_data":
                                  "data:application/pdf;base64," + base64.b64encode(pdf).decode()}},
        {"type": "text", "text": "Summarise."}]}]
    result = client(server).chat.completions.create(model=MODEL, messages=messages,
                                                    max_tokens=3, **GREEDY)
    counted = tokenize(server, messages=messages)
    assert result.usage.prompt_tokens == counted["count"]
    assert counted["image_tokens"] > 0
    begin = token_id(server, "<|begin_of_image|>")
    assert counted["tokens"].count(begin) == 2  # one image per page


def token_id(server: Server, text: str) -> int:
    ids = tokenize(server, prompt=text)["tokens"]
    assert len(ids) == 1
    return int(ids[0])


def test_tools_and_tool_choice(server: Server) -> None:
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    if server.variant not in GLM45_LAYOUT:
        with pytest.raises(openai.BadRequestError, match="does not support tools"):
            client(server).chat.completions.create(model=MODEL, messages=messages,
                                                   max_tokens=2, tools=[WEATHER])
        return
    auto = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                                  tools=[WEATHER], **GREEDY)
    assert auto.usage.prompt_tokens == tokenize(server, messages=messages,
                                                tools=[WEATHER])["count"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    forced = client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=4, tools=[WEATHER], tool_choice=named,
        **GREEDY)
    counted = tokenize(server, messages=messages, tools=[WEATHER], tool_choice=named)
    assert forced.usage.prompt_tokens == counted["count"] > auto.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client(server).chat.completions.create(model=MODEL, messages=messages,
                                               tool_choice="required", max_tokens=2)
    unknown = {"type": "function", "function": {"name": "get_time"}}
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                               tools=[WEATHER], tool_choice=unknown)


def test_thinking_switch(server: Server) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    if server.variant not in GLM45_LAYOUT:  # GLM-4.1V always thinks: the switch changes nothing
        assert tokenize(server, messages=messages)["count"] == tokenize(
            server, messages=messages, chat_template_kwargs={"enable_thinking": False})["count"]
        reply = client(server).chat.completions.create(
            model=MODEL, messages=messages, max_tokens=6, **GREEDY)
        assert reply.usage.completion_tokens == 6
        return
    off = client(server).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}})
    assert getattr(off.choices[0].message, "reasoning_content", None) is None
    assert off.usage.completion_tokens_details.reasoning_tokens == 0
    on = tokenize(server, messages=messages)["count"]
    assert off.usage.prompt_tokens == tokenize(
        server, messages=messages, chat_template_kwargs={"enable_thinking": False})["count"]
    assert off.usage.prompt_tokens > on


def test_completions_and_errors(server: Server) -> None:
    result = client(server).completions.create(model=MODEL, prompt="Once upon a time",
                                               max_tokens=5, **GREEDY)
    assert result.usage.completion_tokens == 5
    with pytest.raises(openai.NotFoundError):
        client(server).chat.completions.create(model="gpt-4o", max_tokens=1,
                                               messages=[{"role": "user", "content": "x"}])
    outside = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]
    with pytest.raises(openai.BadRequestError, match="allowed-local-media-path"):
        client(server).chat.completions.create(model=MODEL, messages=outside, max_tokens=1)


def test_disconnect_mid_stream_aborts_the_request(server: Server) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Go on forever."}],
            "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.api + "/chat/completions", json=body,
                      timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(5):
            assert next(lines).startswith("data: ")
            next(lines)  # the blank line ending the event
        assert server.metric("glmv_num_requests_running") == 1
        assert server.metric("glmv_kv_cache_blocks_used") > 0
    # The connection is closed: the server notices and aborts the request.
    deadline = time.monotonic() + 20
    while server.metric("glmv_num_requests_running") or server.metric(
            "glmv_kv_cache_blocks_used") or server.metric("glmv_num_requests_in_flight"):
        assert time.monotonic() < deadline, "request still running"
        time.sleep(0.1)
    assert server.metric("glmv_engine_steps") < 2000  # stopped long before its 3000 tokens
    # ... and goes on serving.
    assert json.loads(httpx.get(server.url + "/v1/models").text)["data"][0]["id"] == MODEL
