"""Chat templates: protocol goldens (reference section 2) and parity with transformers.

Every case is rendered for every variant with glmv's jinja sandbox and compared
(a) with the exact string the protocol gives (or derives from its per-variant rules), and
(b) with transformers' `apply_chat_template` on the same checkpoint (tokenizer and processor).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import pytest

from glmv.chat_template import compile_template, normalize_messages, plain_data, render
from glmv.errors import ChatTemplateError
from glmv.tiny.writer import chat_template_text
from glmv.tokenizer import Tokenizer
from tests.conftest import TEMPLATE_OF, VARIANTS

P = "[gMASK]<sop>"
IMG = "<|begin_of_image|><|image|><|end_of_image|>"
VID = "<|begin_of_video|><|video|><|end_of_video|>"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

# Protocol 2.2 (f), verbatim (4.5V rendering).
F_GLM45V = """[gMASK]<sop><|system|>
# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{"type": "function", "function": {"name": "get_weather", "description": "Get weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
</tools>

For each function call, output the function name and arguments within the following XML format:
<tool_call>{function-name}
<arg_key>{arg-key-1}</arg_key>
<arg_value>{arg-value-1}</arg_value>
<arg_key>{arg-key-2}</arg_key>
<arg_value>{arg-value-2}</arg_value>
...
</tool_call><|system|>
You are a helpful assistant.<|user|>
Weather in Beijing for 2 days?<|assistant|>
<think>Need tool.</think>
<tool_call>get_weather
<arg_key>city</arg_key>
<arg_value>Beijing</arg_value>
<arg_key>days</arg_key>
<arg_value>2</arg_value>
</tool_call><|observation|>
<tool_response>
{"temp": 20}
</tool_response>
<tool_response>
second result
</tool_response><|assistant|>
"""  # noqa: E501
# 4.6V family: every string tool result is followed by an extra "\n" (protocol 2.2 rule 5).
F_GLM46V = F_GLM45V.replace("</tool_response>", "</tool_response>\n")


def _tool_loop(arguments: Any) -> list[dict[str, Any]]:
    """Protocol case (f): system, user, assistant tool call, two consecutive tool results."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Weather in Beijing for 2 days?"},
        {"role": "assistant", "content": "<think>Need tool.</think>", "tool_calls": [
            {"type": "function", "id": "call_0",
             "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temp": 20}'},
        {"role": "tool", "tool_call_id": "call_0", "content": "second result"},
    ]


def _screenshot_loop(tool_content: Any, arguments: Any = None) -> list[dict[str, Any]]:
    """A tool call without arguments (OpenAI style: content null) and one tool result."""
    function: dict[str, Any] = {"name": "screenshot"}
    if arguments is not None:
        function["arguments"] = arguments
    return [
        {"role": "user", "content": "Take a screenshot"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "id": "c1", "function": function}]},
        {"role": "tool", "tool_call_id": "c1", "content": tool_content},
    ]


SCREENSHOT_PREFIX = (P + "<|user|>\nTake a screenshot<|assistant|>\n<think></think>\n"
                     "<tool_call>screenshot\n</tool_call><|observation|>\n<tool_response>\n")
# GLM-4.1V has no tool support: tool messages are dropped, tool calls ignored, content verbatim.
SCREENSHOT_41V = P + "<|user|>\nTake a screenshot<|assistant|>\n<|assistant|>\n"

RICH_ARGS = {"n": 2, "ids": [1, 2], "opts": {"a": 1}, "ratio": 0.5, "ok": True, "none": None,
             "city": "北京", "meta": {"城市": "上海", "emoji": "😀"}}
RICH_ARGS_RENDERED = "".join(
    f"\n<arg_key>{k}</arg_key>\n<arg_value>{v}</arg_value>" for k, v in [
        ("n", "2"), ("ids", "[1, 2]"), ("opts", '{"a": 1}'), ("ratio", "0.5"), ("ok", "true"),
        ("none", "null"), ("city", "北京"), ("meta", '{"城市": "上海", "emoji": "😀"}')])
UNICODE_TOOL = {"type": "function", "function": {
    "name": "set", "description": "设置 ✅", "parameters": {"type": "object", "properties": {}}}}


@dataclass(frozen=True)
class Case:
    """One conversation; `golden` maps a template name (glm41v/glm45v/glm46v) to its rendering."""

    name: str
    messages: list[dict[str, Any]]
    golden: dict[str, str]
    tools: list[dict[str, Any]] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    normalize: bool = False  # pass the messages through normalize_messages first (OpenAI shape)


def _same(text: str) -> dict[str, str]:
    return {"glm41v": text, "glm45v": text, "glm46v": text}


CASES = [
    Case("text", [{"role": "user", "content": "Hello"}],
         _same(P + "<|user|>\nHello<|assistant|>\n")),
    Case("image", [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        _same(P + f"<|user|>\n{IMG}What is this?<|assistant|>\n")),
    Case("interleaved", [{"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"},
        {"type": "text", "text": "which?"}]}],
        _same(P + f"<|user|>\nCompare{IMG}{IMG}which?<|assistant|>\n")),
    Case("interleaved_text_between", [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "then"}, {"type": "image"},
        {"type": "text", "text": "and"}, {"type": "video"}]}],
        _same(P + f"<|user|>\n{IMG}then{IMG}and{VID}<|assistant|>\n")),
    Case("video", [{"role": "user", "content": [
        {"type": "video"}, {"type": "text", "text": "Describe."}]}],
        _same(P + f"<|user|>\n{VID}Describe.<|assistant|>\n")),
    Case("openai_media_parts", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.invalid/a.png"}},
        {"type": "video_url", "video_url": {"url": "http://example.invalid/v.mp4"}},
        "plain string part"]}],
        _same(P + f"<|user|>\n{IMG}{VID}plain string part<|assistant|>\n"), normalize=True),
    Case("system", [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": "Hi"}],
         _same(P + "<|system|>\nYou are a helpful assistant.<|user|>\nHi<|assistant|>\n")),
    # System content given as parts: text parts joined (4.5V/4.6V); 4.1V prints it raw (a repr).
    Case("system_list_content", [
        {"role": "system",
         "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
        {"role": "user", "content": "Hi"}], {
        "glm41v": P + "<|system|>\n[{'type': 'text', 'text': 'A'}, {'type': 'text', 'text': 'B'}]"
                      "<|user|>\nHi<|assistant|>\n",
        "glm45v": P + "<|system|>\nAB<|user|>\nHi<|assistant|>\n",
        "glm46v": P + "<|system|>\nAB<|user|>\nHi<|assistant|>\n"}),
    # (d): earlier reasoning is stripped by the 4.5V/4.6V templates; 4.1V keeps history verbatim.
    Case("multi_turn", [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": "<think>R1</think>A1"},
        {"role": "user", "content": "Q2"}], {
        "glm41v": P + f"<|user|>\n{IMG}Q1<|assistant|>\n<think>R1</think>A1<|user|>\nQ2"
                      "<|assistant|>\n",
        "glm45v": P + f"<|user|>\n{IMG}Q1<|assistant|>\n<think></think>\nA1<|user|>\nQ2"
                      "<|assistant|>\n",
        "glm46v": P + f"<|user|>\n{IMG}Q1<|assistant|>\n<think></think>\nA1<|user|>\nQ2"
                      "<|assistant|>\n"}),
    Case("multi_turn_answer_tags", [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
        {"role": "assistant", "content": "<think>R1</think><answer>A1</answer>"},
        {"role": "user", "content": "Q2"}], {
        "glm41v": P + f"<|user|>\n{IMG}Q1<|assistant|>\n<think>R1</think><answer>A1</answer>"
                      "<|user|>\nQ2<|assistant|>\n",
        "glm45v": P + f"<|user|>\n{IMG}Q1<|assistant|>\n<think></think>\n<answer>A1</answer>"
                      "<|user|>\nQ2<|assistant|>\n"}),
    Case("multi_turn_reasoning_field", [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "reasoning_content": "R1", "content": "A1"},
        {"role": "user", "content": "Q2"}], {
        "glm41v": P + "<|user|>\nQ1<|assistant|>\nA1<|user|>\nQ2<|assistant|>\n",
        "glm45v": P + "<|user|>\nQ1<|assistant|>\n<think></think>\nA1<|user|>\nQ2<|assistant|>\n",
        "glm46v": P + "<|user|>\nQ1<|assistant|>\n<think></think>\nA1<|user|>\nQ2<|assistant|>\n"}),
    # (d'): the assistant message after the last user keeps its reasoning.
    Case("final_assistant_keeps_reasoning", [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>R1</think>A1"}],
        {"glm41v": P + "<|user|>\nQ1<|assistant|>\n<think>R1</think>A1",
         "glm45v": P + "<|user|>\nQ1<|assistant|>\n<think>R1</think>\nA1",
         "glm46v": P + "<|user|>\nQ1<|assistant|>\n<think>R1</think>\nA1"},
        add_generation_prompt=False),
    Case("final_assistant_reasoning_field", [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "reasoning": "\nR1\n", "content": "\nA1"}],
        {"glm41v": P + "<|user|>\nQ1<|assistant|>\n\nA1",
         "glm45v": P + "<|user|>\nQ1<|assistant|>\n<think>R1</think>\nA1",
         "glm46v": P + "<|user|>\nQ1<|assistant|>\n<think>R1</think>\nA1"},
        add_generation_prompt=False),
    # (g): enable_thinking=False; 4.1V ignores it.
    Case("no_thinking", [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": "q"}]}], {
        "glm41v": P + f"<|user|>\n{IMG}q<|assistant|>\n",
        "glm45v": P + f"<|user|>\n{IMG}q/nothink<|assistant|>\n<think></think>\n",
        "glm46v": P + f"<|user|>\n{IMG}q/nothink<|assistant|>\n<think></think>\n"},
        kwargs={"enable_thinking": False}),
    Case("no_thinking_multi_turn", [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}], {
        "glm41v": P + "<|user|>\nQ1<|assistant|>\nA1<|user|>\nQ2<|assistant|>\n",
        "glm45v": P + "<|user|>\nQ1/nothink<|assistant|>\n<think></think>\nA1<|user|>\nQ2/nothink"
                      "<|assistant|>\n<think></think>\n",
        "glm46v": P + "<|user|>\nQ1/nothink<|assistant|>\n<think></think>\nA1<|user|>\nQ2/nothink"
                      "<|assistant|>\n<think></think>\n"},
        kwargs={"enable_thinking": False}),
    Case("no_thinking_already_suffixed", [{"role": "user", "content": "Q/nothink"}], {
        "glm41v": P + "<|user|>\nQ/nothink<|assistant|>\n",
        "glm45v": P + "<|user|>\nQ/nothink<|assistant|>\n<think></think>\n",
        "glm46v": P + "<|user|>\nQ/nothink<|assistant|>\n<think></think>\n"},
        kwargs={"enable_thinking": False}),
    # enable_thinking=True renders exactly like leaving it undefined.
    Case("thinking_true_multi_turn", [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}], {
        "glm41v": P + "<|user|>\nQ1<|assistant|>\nA1<|user|>\nQ2<|assistant|>\n",
        "glm45v": P + "<|user|>\nQ1<|assistant|>\n<think></think>\nA1<|user|>\nQ2<|assistant|>\n",
        "glm46v": P + "<|user|>\nQ1<|assistant|>\n<think></think>\nA1<|user|>\nQ2<|assistant|>\n"},
        kwargs={"enable_thinking": True}),
    # (f): tools + system + assistant tool call + two consecutive tool results.
    Case("tools", _tool_loop({"city": "Beijing", "days": 2}), {
        "glm41v": P + "<|system|>\nYou are a helpful assistant.<|user|>\nWeather in Beijing for 2 "
                      "days?<|assistant|>\n<think>Need tool.</think><|assistant|>\n",
        "glm45v": F_GLM45V, "glm46v": F_GLM46V}, tools=[WEATHER_TOOL]),
    # OpenAI clients send arguments as a JSON string: normalize_messages parses it.
    Case("tools_json_string_arguments", _tool_loop('{"city": "Beijing", "days": 2}'),
         {"glm45v": F_GLM45V, "glm46v": F_GLM46V}, tools=[WEATHER_TOOL], normalize=True),
    Case("tool_call_no_arguments", _screenshot_loop("done", arguments={}), {
        "glm41v": SCREENSHOT_41V,
        "glm45v": SCREENSHOT_PREFIX + "done\n</tool_response><|assistant|>\n",
        "glm46v": SCREENSHOT_PREFIX + "done\n</tool_response>\n<|assistant|>\n"}),
    Case("tool_call_empty_string_arguments", _screenshot_loop("done", arguments=""), {
        "glm45v": SCREENSHOT_PREFIX + "done\n</tool_response><|assistant|>\n",
        "glm46v": SCREENSHOT_PREFIX + "done\n</tool_response>\n<|assistant|>\n"}, normalize=True),
    # (f'): 4.6V family renders media inside list-valued tool results; 4.5V keeps only the text.
    Case("tool_result_with_image", _screenshot_loop(
        [{"type": "text", "text": "Here is the screen:"}, {"type": "image"}], arguments={}), {
        "glm41v": SCREENSHOT_41V,
        "glm45v": SCREENSHOT_PREFIX + "Here is the screen:\n</tool_response><|assistant|>\n",
        "glm46v": SCREENSHOT_PREFIX + f"Here is the screen:{IMG}\n</tool_response>"
                                      "<|assistant|>\n"}),
    Case("tool_result_with_video_and_object", _screenshot_loop(
        [{"type": "video"}, {"type": "image_url", "image_url": {"url": "http://x.invalid/a.png"}},
         {"type": "json", "data": {"键": 1}}], arguments={}), {
        "glm46v": SCREENSHOT_PREFIX + f'{VID}{IMG}{{"type": "json", "data": {{"键": 1}}}}'
                                      "\n</tool_response><|assistant|>\n"}),
    # Non-string argument values go through tojson (no ASCII escaping); strings stay raw.
    Case("tool_call_rich_arguments", [
        {"role": "user", "content": "设置"},
        {"role": "assistant", "content": "ok", "tool_calls": [
            {"type": "function", "function": {"name": "set", "arguments": RICH_ARGS}}]}], {
        "glm45v": P + "<|system|>\n# Tools\n\nYou may call one or more functions to assist with "
                      "the user query.\n\nYou are provided with function signatures within "
                      "<tools></tools> XML tags:\n<tools>\n" + json.dumps(UNICODE_TOOL,
                                                                          ensure_ascii=False)
                      + "\n</tools>\n\nFor each function call, output the function name and "
                      "arguments within the following XML format:\n<tool_call>{function-name}\n"
                      "<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
                      "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n"
                      "</tool_call><|user|>\n设置<|assistant|>\n<think></think>\nok\n"
                      "<tool_call>set" + RICH_ARGS_RENDERED + "\n</tool_call>"},
        tools=[UNICODE_TOOL], add_generation_prompt=False),
]
CASE_IDS = [c.name for c in CASES]


def _messages(case: Case) -> list[dict[str, Any]]:
    msgs = copy.deepcopy(case.messages)
    return normalize_messages(msgs) if case.normalize else msgs


def render_case(variant: str, case: Case) -> str:
    source = chat_template_text(f"{TEMPLATE_OF[variant]}.jinja")
    return render(source, _messages(case), tools=copy.deepcopy(case.tools),
                  add_generation_prompt=case.add_generation_prompt, **case.kwargs)


GOLDEN_PARAMS = [
    pytest.param(v, c, id=f"{v}-{c.name}")
    for c in CASES for v in VARIANTS if TEMPLATE_OF[v] in c.golden
]
ALL_PARAMS = [pytest.param(v, c, id=f"{v}-{c.name}") for c in CASES for v in VARIANTS]


def test_every_case_has_goldens_for_the_families_it_targets() -> None:
    # Guards the table itself: each template family has goldens for the core protocol cases.
    for template in ("glm41v", "glm45v", "glm46v"):
        covered = {c.name for c in CASES if template in c.golden}
        assert {"text", "image", "video", "system", "multi_turn", "no_thinking"} <= covered


@pytest.mark.parametrize(("variant", "case"), GOLDEN_PARAMS)
def test_render_matches_protocol_golden(variant: str, case: Case) -> None:
    assert render_case(variant, case) == case.golden[TEMPLATE_OF[variant]]


@pytest.mark.parametrize(("variant", "case"), ALL_PARAMS)
def test_render_matches_transformers(variant: str, case: Case, tiny_checkpoint: Any,
                                     hf_tokenizer: Any, hf_processor: Any) -> None:
    ckpt = tiny_checkpoint(variant)
    ours = Tokenizer.from_pretrained(ckpt).render_chat(
        _messages(case), tools=copy.deepcopy(case.tools),
        add_generation_prompt=case.add_generation_prompt, **case.kwargs)
    assert ours == render_case(variant, case)
    common = dict(tools=copy.deepcopy(case.tools), add_generation_prompt=case.add_generation_prompt,
                  tokenize=False, **case.kwargs)
    by_tokenizer = hf_tokenizer(variant).apply_chat_template(_messages(case), **common)
    assert ours == by_tokenizer
    by_processor = hf_processor(variant).apply_chat_template(_messages(case), **common)
    assert ours == by_processor


@pytest.mark.parametrize("variant", VARIANTS)
def test_checkpoint_ships_the_variant_template(variant: str, tiny_checkpoint: Any) -> None:
    ckpt: Path = tiny_checkpoint(variant)
    shipped = (ckpt / "chat_template.jinja").read_text("utf-8")
    assert shipped == chat_template_text(f"{TEMPLATE_OF[variant]}.jinja")
    assert Tokenizer.from_pretrained(ckpt).chat_template == shipped


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "glm-4.1v-thinking"])
def test_enable_thinking_true_renders_as_undefined(variant: str) -> None:
    case = next(c for c in CASES if c.name == "thinking_true_multi_turn")
    undefined = Case(case.name, case.messages, case.golden)
    assert render_case(variant, case) == render_case(variant, undefined)
    assert "/nothink" not in render_case(variant, case)


def test_whitespace_quirk_after_string_tool_results() -> None:
    """4.6V: `</tool_response>\\n` after a string result; 4.5V: none (protocol 2.2 rule 5)."""
    case = next(c for c in CASES if c.name == "tools")
    glm45, glm46 = render_case("glm-4.5v", case), render_case("glm-4.6v", case)
    assert glm45.endswith("{\"temp\": 20}\n</tool_response>\n<tool_response>\nsecond result\n"
                          "</tool_response><|assistant|>\n")
    assert glm46.endswith("{\"temp\": 20}\n</tool_response>\n\n<tool_response>\nsecond result\n"
                          "</tool_response>\n<|assistant|>\n")
    assert glm46 == glm45.replace("</tool_response>", "</tool_response>\n")
    # A list-valued result in 4.6V has no trailing newline.
    listed = next(c for c in CASES if c.name == "tool_result_with_image")
    assert render_case("glm-4.6v", listed).endswith(f"{IMG}\n</tool_response><|assistant|>\n")


@pytest.mark.parametrize("variant", VARIANTS)
def test_tool_turn_structure(variant: str) -> None:
    case = next(c for c in CASES if c.name == "tools")
    text = render_case(variant, case)
    if variant == "glm-4.6v-flash":
        assert text == render_case("glm-4.6v", case)  # the same template file
    if variant == "glm-4.1v-thinking":
        assert "# Tools" not in text and "<|observation|>" not in text
    else:
        assert text.count("<|observation|>") == 1  # consecutive tool results share one turn
        assert text.count("<tool_response>") == 2


def test_openai_arguments_string_equals_mapping() -> None:
    as_string = normalize_messages(_tool_loop('{"city": "Beijing", "days": 2}'))
    assert as_string[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Beijing", "days": 2}
    assert as_string == normalize_messages(_tool_loop({"city": "Beijing", "days": 2}))


@pytest.mark.parametrize("template", ["glm45v", "glm46v"])
def test_unnormalized_string_arguments_are_not_silently_dropped(template: str) -> None:
    msgs = _tool_loop('{"city": "Beijing", "days": 2}')
    with pytest.raises(ChatTemplateError):
        render(chat_template_text(f"{template}.jinja"), msgs, tools=[WEATHER_TOOL])


def test_normalize_messages_media_parts_and_no_mutation() -> None:
    original = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "u"}}, {"type": "input_image", "image": "x"},
        {"type": "video_url", "video_url": {"url": "v"}}, "t"]}]
    before = copy.deepcopy(original)
    out = normalize_messages(original)
    assert [p["type"] for p in out[0]["content"]] == ["image", "image", "video", "text"]
    assert out[0]["content"][0]["image_url"] == {"url": "u"}  # the source stays for the processor
    assert out[0]["content"][3] == {"type": "text", "text": "t"}
    assert original == before


def test_plain_data_replaces_rich_objects() -> None:
    class Blob:
        pass

    data = plain_data({"a": (1, Blob()), "b": [True, None, 1.5]})
    assert data == {"a": (1, "<Blob>"), "b": [True, None, 1.5]}


# ----------------------------------------------------------------------------------- errors


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(ChatTemplateError, match=r"line 3"):
        compile_template("[gMASK]<sop>\n{{ messages }}\n{% if %}\n")
    with pytest.raises(ChatTemplateError, match=r"syntax error \(line 2\)"):
        render("ok\n{% for m in messages %}", [{"role": "user", "content": "x"}])


def test_raise_exception_becomes_chat_template_error() -> None:
    source = ("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}"
              "{% endif %}")
    assert render(source, [{"role": "user", "content": "x"}]) == ""
    with pytest.raises(ChatTemplateError, match="first must be user"):
        render(source, [{"role": "system", "content": "x"}])


@pytest.mark.parametrize("bad", [["hello"], [None], [["role", "user"]], [1]])
def test_messages_must_be_objects(bad: list[Any]) -> None:
    source = chat_template_text("glm46v.jinja")
    with pytest.raises(ChatTemplateError, match="must be an object"):
        render(source, bad)
    with pytest.raises(ChatTemplateError, match="must be an object"):
        normalize_messages(bad)


def test_invalid_json_arguments() -> None:
    with pytest.raises(ChatTemplateError, match=r"'get_weather'.*not valid JSON"):
        normalize_messages(_tool_loop('{"city": "Beijing",'))
    with pytest.raises(ChatTemplateError, match="must be an object"):
        normalize_messages(_tool_loop("[1, 2]"))
    with pytest.raises(ChatTemplateError):
        normalize_messages([{"role": "user", "content": [42]}])


def test_render_errors_on_bad_message_shapes_are_typed() -> None:
    # A content value the template cannot iterate fails inside jinja: typed, not a raw TypeError.
    with pytest.raises(ChatTemplateError):
        render(chat_template_text("glm46v.jinja"), [{"role": "user", "content": 5}])


def test_content_none_is_dropped_like_transformers() -> None:
    msgs = [{"role": "user", "content": "Hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]}]
    out = render(chat_template_text("glm45v.jinja"), msgs, add_generation_prompt=False)
    assert "None" not in out
    assert out == (P + "<|user|>\nHi<|assistant|>\n<think></think>\n<tool_call>f\n<arg_key>a"
                       "</arg_key>\n<arg_value>1</arg_value>\n</tool_call>")


def test_sandbox_refuses_escapes() -> None:
    msgs = [{"role": "user", "content": "x"}]
    # A single unsafe attribute is an undefined value (renders empty), never the real object ...
    assert render("{{ ''.__class__ }}{{ raise_exception.__globals__ }}", msgs) == ""
    # ... and using it any further is refused.
    for source in (
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__ }}",
        "{% set l = [1] %}{{ l.append(2) }}",  # immutable sandbox: no mutation of data
        "{% set d = dict(a=1) %}{{ d.update(b=2) }}",
    ):
        with pytest.raises(ChatTemplateError, match="unsafe") as info:
            render(source, msgs)
        assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)
    for source in (
        "{% set ns = namespace(a=1) %}{% set ns.__class__ = 1 %}",
        "{% set ns = namespace(a=1) %}{% set ns._private = 1 %}",
        "{% set ns = namespace(__dict__=1) %}",
    ):
        with pytest.raises(ChatTemplateError, match="not allowed") as info:
            render(source, msgs)
        assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)


def test_sandbox_matches_transformers_refusals() -> None:
    utils = pytest.importorskip("transformers.utils.chat_template_utils",
                                reason="transformers is the reference")
    msgs = [{"role": "user", "content": "x"}]
    for source in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns.__x = 1 %}"):
        with pytest.raises(jinja2.exceptions.SecurityError):
            utils.render_jinja_template([msgs], chat_template=source)
        with pytest.raises(ChatTemplateError):
            render(source, msgs)
    # Globals and filters behave the same.
    source = "{{ dict(a=1) | tojson }}|{{ {'k': 'é'} | tojson(indent=1) }}|{{ 'x' is string }}"
    theirs = utils.render_jinja_template([msgs], chat_template=source)[0][0]
    assert render(source, msgs) == theirs == '{"a": 1}|{\n "k": "é"\n}|True'
