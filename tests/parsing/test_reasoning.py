"""Reasoning vs content: GLM-4.1V `<think>…</think><answer>…</answer>` and the GLM-4.5V/4.6V
hybrid `<think>…</think>` (protocol 3.1-3.3), with the server's prefills."""

from __future__ import annotations

import pytest

from glmv.errors import ConfigError
from glmv.parsing import REASONING_STYLES, ParserConfig, parse_completion
from tests.parsing.cases import THINK_OFF, TOOLS, Case, call, params

GLM41V_CASES = [
    Case("41v-normal", "<think>Look at it.</think><answer>A cat.</answer>",
         "Look at it.", "A cat.", model="glm41v"),
    Case("41v-newlines", "<think>\nLook at it.\n</think>\n<answer>\nA cat.</answer>",
         "Look at it.", "A cat.", model="glm41v"),
    Case("41v-answer-tags-missing", "<think>Hmm.</think>\nA cat.", "Hmm.", "A cat.",
         model="glm41v"),
    Case("41v-answer-not-closed", "<think>Hmm.</think><answer>A c", "Hmm.", "A c",
         model="glm41v"),
    Case("41v-cut-in-reasoning", "<think>Let me think about", "Let me think about", None,
         model="glm41v"),
    Case("41v-cut-after-think-end", "<think>R</think>", "R", None, model="glm41v"),
    Case("41v-no-think", "A cat.", None, "A cat.", model="glm41v"),
    Case("41v-no-think-answer-tags", "<answer>A cat.</answer>", None, "A cat.",
         model="glm41v"),
    Case("41v-empty-think", "<think></think><answer>Yes</answer>", None, "Yes",
         model="glm41v"),
    Case("41v-ignores-enable-thinking", "<think>R</think><answer>A</answer>", "R", "A",
         model="glm41v", kwargs={"enable_thinking": False}),
    Case("41v-answer-inside-reasoning-is-text", "<think>use <answer> tags</think>A",
         "use <answer> tags", "A", model="glm41v"),
    Case("41v-no-tool-parsing", "<think>R</think><answer>" + call("get_time") + "</answer>",
         "R", call("get_time"), model="glm41v", kwargs={"tools": TOOLS}),
    Case("41v-box-answer", "<think>R</think><answer><|begin_of_box|>Paris<|end_of_box|>"
         "</answer>", "R", "Paris", model="glm41v"),
    Case("41v-leading-whitespace", "\n \n<think>R</think><answer>A</answer>", "R", "A",
         model="glm41v"),
    Case("41v-empty", "", None, None, model="glm41v"),
]

GLM45_CASES = [
    Case("45-thinking-on", "<think>The user asks.</think>\nThe answer is 4.",
         "The user asks.", "The answer is 4."),
    Case("45-multiline", "<think>Step 1.\n\nStep 2.\n</think>\n\nLine 1.\nLine 2.",
         "Step 1.\n\nStep 2.", "Line 1.\nLine 2."),
    Case("45-thinking-off-prefill", "The answer is 4.", None, "The answer is 4.",
         kwargs={"enable_thinking": False, "prefill": THINK_OFF}),
    Case("45-thinking-off-output-has-empty-think", "<think></think>\nThe answer.", None,
         "The answer.", kwargs={"enable_thinking": False}),
    Case("45-thinking-off-think-tags-are-content", "<think>x</think>y", None,
         "<think>x</think>y", kwargs={"enable_thinking": False, "prefill": THINK_OFF}),
    Case("45-model-skips-thinking", "<think></think>\nDirect answer.", None,
         "Direct answer."),
    Case("45-no-think-tag-is-content", "Direct answer.", None, "Direct answer."),
    Case("45-end-without-start-is-content", "R</think>A", None, "R</think>A"),
    Case("45-cut-in-reasoning", "<think>Let me look at the", "Let me look at the", None),
    Case("45-cut-in-start-tag", "<thi", None, "<thi"),
    Case("45-start-tag-only", "<think>", None, None),
    Case("45-whitespace-only-reasoning", "<think>\n\n</think>\nA", None, "A"),
    Case("45-leading-whitespace", "\n\n  <think>\nR\n</think>\n\n  A  b", "R", "A  b"),
    Case("45-inner-whitespace-kept", "<think>a \n\n b</think>x \n y", "a \n\n b", "x \n y"),
    Case("45-stray-end-in-content", "<think>R</think>A</think>B", "R", "A</think>B"),
    Case("45-answer-tags-stay-text", "<think>R</think><answer>A</answer>", "R",
         "<answer>A</answer>"),
    Case("45-second-think-is-text", "<think>R</think>A<think>B", "R", "A<think>B"),
    Case("45-unicode", "<think>思考。</think>\n答案：北京 🌧", "思考。", "答案：北京 🌧"),
    # Tool calls and reasoning (protocol 3.2 / 3.3).
    Case("45-call-after-think", "<think>Need the weather.</think>\n"
         + call("get_weather", ("city", "北京"), ("days", "2")),
         "Need the weather.", None, (("get_weather", {"city": "北京", "days": 2}),),
         kwargs={"tools": TOOLS}),
    Case("45-call-inside-think-ends-reasoning", "<think>Need the weather.\n"
         + call("get_weather", ("city", "Rome")),
         "Need the weather.", None, (("get_weather", {"city": "Rome"}),),
         kwargs={"tools": TOOLS}),
    Case("45-call-inside-think-then-think-end", "<think>R\n" + call("get_time")
         + "\n</think>\nDone.", "R", "Done.", (("get_time", {}),), kwargs={"tools": TOOLS}),
    Case("45-call-inside-think-then-text-then-end", "<think>R" + call("get_time")
         + "more</think>after", "R", "moreafter", (("get_time", {}),),
         kwargs={"tools": TOOLS}),
    Case("45-second-think-end-after-call-is-text", "<think>R" + call("get_time")
         + "</think>A</think>", "R", "A</think>", (("get_time", {}),), kwargs={"tools": TOOLS}),
    Case("45-call-in-think-tool-choice-none", "<think>R" + call("get_time") + "</think>A",
         "R" + call("get_time"), "A", kwargs={"tools": TOOLS, "tool_choice": "none"}),
    Case("45-text-after-call-and-two-calls", "<think>R</think>\nLet me check.\n"
         + call("get_weather", ("city", "Paris")) + "\n" + call("get_time")
         + "\nBoth requested.",
         "R", "Let me check.\nBoth requested.",
         (("get_weather", {"city": "Paris"}), ("get_time", {})), kwargs={"tools": TOOLS}),
    Case("45-skip-thinking-then-call", call("get_time"), None, None, (("get_time", {}),),
         kwargs={"tools": TOOLS}),
    Case("45-thinking-off-call", call("get_time"), None, None, (("get_time", {}),),
         kwargs={"tools": TOOLS, "enable_thinking": False, "prefill": THINK_OFF}),
    Case("45-empty", "", None, None),
    Case("45-whitespace-only", " \n\t", None, None),
]

CASES = GLM41V_CASES + GLM45_CASES


@pytest.mark.parametrize("case", params(CASES))
def test_reasoning_table(case: Case) -> None:
    case.check(parse_completion(case.text, case.config, **case.kwargs))


def test_prefill_is_parsed_with_the_text() -> None:
    """The prefill is part of the parse: `<think>` prefilled + the model's reasoning."""
    config = ParserConfig.for_model("glm4v_moe", has_answer_tags=False)
    parsed = parse_completion("R</think>A", config, prefill="<think>")
    assert (parsed.reasoning, parsed.content) == ("R", "A")


@pytest.mark.parametrize("name", sorted(REASONING_STYLES))
def test_styles_are_registered_by_name(name: str) -> None:
    assert REASONING_STYLES[name].name == name
    assert ParserConfig(reasoning=name, enable_tools=False).reasoning == name


def test_unknown_style_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="glm41v, glm45"):
        ParserConfig(reasoning="deepseek", enable_tools=False)


def test_no_reasoning_style_is_all_content() -> None:
    config = ParserConfig(reasoning=None, enable_tools=True)
    parsed = parse_completion("<think>R</think>A" + call("get_time"), config, tools=TOOLS)
    assert (parsed.reasoning, parsed.content) == (None, "<think>R</think>A")
    assert [c.name for c in parsed.tool_calls] == ["get_time"]
