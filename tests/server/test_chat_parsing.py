"""/v1/chat/completions turns GLM output into OpenAI fields: reasoning_content, tool_calls,
boxes — whole and streamed — with tool_choice and the thinking switch applied to the prompt.

Replies are scripted (ScriptedEngine): a random-weight model cannot be made to write a tool
call; everything after the model (detokenizer, parser, response shaping) is the real path.
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import PIL.Image
import pytest

from tests.helpers import write_mp4

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "metric": {"type": "boolean"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}}}}

CALL_REPLY = ("<think>The user wants weather.</think>\nLet me check."
              "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
              "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
              "<tool_call>get_time\n</tool_call>")


def png_data_url(width: int, height: int) -> str:
    buf = io.BytesIO()
    PIL.Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, *images: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}}
                                   for u in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def stream_events(client: Any, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = client.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status_code == 200
    lines = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def merge_stream(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate the deltas of choice 0 the way an OpenAI client does."""
    merged: dict[str, Any] = {"content": "", "reasoning_content": "", "tool_calls": {},
                              "boxes": [], "finish_reason": None}
    for event in events:
        for choice in event["choices"]:
            assert choice["index"] == 0
            delta = choice["delta"]
            merged["content"] += delta.get("content") or ""
            merged["reasoning_content"] += delta.get("reasoning_content") or ""
            merged["boxes"] += delta.get("boxes", [])
            for call in delta.get("tool_calls", []):
                slot = merged["tool_calls"].setdefault(call["index"], {"name": None,
                                                                       "arguments": ""})
                if "name" in call["function"]:
                    assert slot["name"] is None, "a tool name is sent once"
                    slot["name"] = call["function"]["name"]
                    assert call["id"].startswith("call_")
                slot["arguments"] += call["function"]["arguments"]
            merged["finish_reason"] = choice["finish_reason"] or merged["finish_reason"]
    return merged


@pytest.fixture
def scripted(server_client: Any) -> Any:
    return server_client("glm-4.6v", scripted=True)


def engine_of(client: Any) -> Any:
    return client.app.state.ctx.engine


def test_reasoning_is_split_from_content(scripted: Any) -> None:
    engine_of(scripted).replies = ["<think>Two and two.</think>\nThe answer is 4."]
    body = {"messages": user("2+2?")}
    message = scripted.post("/v1/chat/completions", json=body).json()
    choice = message["choices"][0]
    assert choice["message"]["reasoning_content"] == "Two and two."
    assert choice["message"]["content"] == "The answer is 4."
    assert choice["finish_reason"] == "stop"
    tok = engine_of(scripted).tokenizer
    assert message["usage"]["completion_tokens_details"]["reasoning_tokens"] == len(
        tok.encode("<think>Two and two."))
    merged = merge_stream(stream_events(scripted, body))
    assert merged["reasoning_content"] == "Two and two."
    assert merged["content"] == "The answer is 4."


def test_tool_calls_whole_and_streamed(scripted: Any) -> None:
    engine_of(scripted).replies = [CALL_REPLY]
    body = {"messages": user("Weather in Paris?"), "tools": [WEATHER, TIME]}
    choice = scripted.post("/v1/chat/completions", json=body).json()["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["reasoning_content"] == "The user wants weather."
    assert message["content"] == "Let me check."
    calls = message["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "days": 3}
    assert json.loads(calls[1]["function"]["arguments"]) == {}
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    merged = merge_stream(stream_events(scripted, body))
    assert merged["finish_reason"] == "tool_calls"
    assert merged["content"] == "Let me check."
    assert [merged["tool_calls"][i]["name"] for i in (0, 1)] == ["get_weather", "get_time"]
    assert [json.loads(merged["tool_calls"][i]["arguments"]) for i in (0, 1)] == [
        {"city": "Paris", "days": 3}, {}]


def test_tool_results_go_back_through_the_template(scripted: Any) -> None:
    engine_of(scripted).replies = ["It is sunny."]
    messages = [
        *user("Weather in Paris?"),
        {"role": "assistant", "content": "", "reasoning_content": "Need a tool.",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {
             "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    response = scripted.post("/v1/chat/completions", json={"messages": messages,
                                                            "tools": [WEATHER]})
    assert response.status_code == 200, response.text
    prompt = engine_of(scripted).prompts[-1].prompt
    assert "<tool_response>" in prompt and "sunny, 24 C" in prompt
    assert "<arg_value>Paris</arg_value>" in prompt
    assert response.json()["choices"][0]["message"]["content"] == "It is sunny."


@pytest.mark.parametrize(("choice", "tail"), [
    ("required", "<tool_call>"),
    ({"type": "function", "function": {"name": "get_weather"}}, "<tool_call>get_weather\n"),
])
def test_tool_choice_forces_a_call_through_the_prompt(scripted: Any, choice: Any,
                                                      tail: str) -> None:
    rest = "<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>"
    engine_of(scripted).replies = [rest if tail.endswith("\n") else "get_weather\n" + rest]
    body = {"messages": user("Weather?"), "tools": [WEATHER, TIME], "tool_choice": choice}
    result = scripted.post("/v1/chat/completions", json=body).json()["choices"][0]
    prompt = engine_of(scripted).prompts[-1].prompt
    assert prompt.endswith("<think></think>\n" + tail)
    assert result["finish_reason"] == "tool_calls"
    [call] = result["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Rome"}
    assert result["message"]["reasoning_content"] is None
    merged = merge_stream(stream_events(scripted, body))
    assert merged["tool_calls"][0]["name"] == "get_weather"
    assert json.loads(merged["tool_calls"][0]["arguments"]) == {"city": "Rome"}


def test_tool_choice_none_leaves_calls_as_text(scripted: Any) -> None:
    engine_of(scripted).replies = ["<tool_call>get_time\n</tool_call>"]
    body = {"messages": user("Time?"), "tools": [TIME], "tool_choice": "none"}
    result = scripted.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert result["message"]["tool_calls"] == []
    assert "get_time" in result["message"]["content"]
    assert "get_time" not in engine_of(scripted).prompts[-1].prompt  # tools not rendered


@pytest.mark.parametrize("bad", [
    {"tool_choice": "required"},  # no tools
    {"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
])
def test_bad_tool_choice_is_a_400(scripted: Any, bad: dict[str, Any]) -> None:
    response = scripted.post("/v1/chat/completions", json={"messages": user("x"), **bad})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tool_choice"


def test_thinking_off_renders_the_switch_and_reads_content(scripted: Any) -> None:
    engine_of(scripted).replies = ["Just the answer."]
    body = {"messages": user("Hi"), "chat_template_kwargs": {"enable_thinking": False}}
    message = scripted.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert message == {**message, "content": "Just the answer.", "reasoning_content": None}
    assert engine_of(scripted).prompts[-1].prompt.endswith("<think></think>\n")


def test_thinking_budget_reaches_the_engine(scripted: Any) -> None:
    scripted.post("/v1/chat/completions", json={"messages": user("Hi"), "thinking_budget": 7})
    assert engine_of(scripted).params[-1].thinking_budget == 7


def test_boxes_in_original_image_pixels(scripted: Any) -> None:
    engine_of(scripted).replies = [
        "<think>Find it.</think>\nThe dog<|begin_of_box|>[[100,200,300,400]]<|end_of_box|>"
        " and the cat <|begin_of_box|>[500, 500, 1000, 1000]<|end_of_box|>."]
    body = {"messages": user("Where?", png_data_url(64, 32), png_data_url(200, 100))}
    message = scripted.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert "begin_of_box" not in message["content"]
    assert message["content"].startswith("The dog[[100,200,300,400]]")
    first, second = message["boxes"]
    # Coordinates are 0-1000 of the last image (200 x 100 pixels).
    assert first["box"] == [100, 200, 300, 400] and first["image_index"] == 1
    assert first["pixels"] == pytest.approx([20, 20, 60, 40])
    assert second["pixels"] == pytest.approx([100, 50, 200, 100])
    merged = merge_stream(stream_events(scripted, body))
    assert merged["boxes"] == message["boxes"]
    kept = scripted.post("/v1/chat/completions", json={**body, "skip_special_tokens": False})
    assert "<|begin_of_box|>[[100,200,300,400]]<|end_of_box|>" in (
        kept.json()["choices"][0]["message"]["content"])


def test_n_choices_are_parsed_each(scripted: Any) -> None:
    engine_of(scripted).replies = ["<think>a</think>A", "<think>b</think>B"]
    body = {"messages": user("Hi"), "n": 2}
    choices = scripted.post("/v1/chat/completions", json=body).json()["choices"]
    assert [(c["message"]["reasoning_content"], c["message"]["content"]) for c in choices] == [
        ("a", "A"), ("b", "B")]
    events = stream_events(scripted, body)
    texts = {0: "", 1: ""}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts == {0: "A", 1: "B"}


def test_glm41v_reads_answer_tags_and_refuses_tools(server_client: Any) -> None:
    client = server_client("glm-4.1v-thinking", scripted=True)
    engine_of(client).replies = ["<think>Hmm.</think><answer>Yes.</answer>"]
    message = client.post("/v1/chat/completions",
                          json={"messages": user("Q")}).json()["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Hmm.", "Yes.")
    response = client.post("/v1/chat/completions", json={"messages": user("Q"),
                                                          "tools": [TIME]})
    assert response.status_code == 400 and "tools" in response.json()["error"]["message"]


def test_history_drops_earlier_reasoning(scripted: Any) -> None:
    messages = [
        *user("First question"),
        {"role": "assistant", "content": "First answer.",
         "reasoning_content": "SECRET-CHAIN-OF-THOUGHT"},
        *user("Second question"),
    ]
    response = scripted.post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 200
    prompt = engine_of(scripted).prompts[-1].prompt
    assert "First answer." in prompt and "SECRET-CHAIN-OF-THOUGHT" not in prompt


def mp4_data_url(tmp_path: Any) -> str:
    path = write_mp4(tmp_path / "clip.mp4")
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def test_media_inside_tool_results_reach_the_model(scripted: Any, tmp_path: Any) -> None:
    # GLM-4.6V renders images and videos in tool results; their tokens count in the prompt.
    messages = [
        *user("Show me the chart."),
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [
            {"type": "text", "text": "Here it is:"},
            {"type": "image_url", "image_url": {"url": png_data_url(56, 56)}},
            {"type": "video_url", "video_url": {"url": mp4_data_url(tmp_path)}}]},
    ]
    result = scripted.post("/v1/chat/completions", json={"messages": messages,
                                                          "tools": [TIME]}).json()
    prompt = engine_of(scripted).prompts[-1]
    assert prompt.num_image_tokens > 0
    assert prompt.num_video_tokens > 0
    details = result["usage"]["prompt_tokens_details"]
    assert (details["image_tokens"], details["video_tokens"]) == (
        prompt.num_image_tokens, prompt.num_video_tokens)
    assert "<tool_response>\nHere it is:<|begin_of_image|>" in (prompt.prompt or "")
