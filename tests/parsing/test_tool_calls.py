"""GLM tool calls -> OpenAI tool calls (protocol 3.4): grammar, content around calls, cut-off
calls, tool_choice, the server's prefills, and awkward argument values."""

from __future__ import annotations

import json
import re

import pytest

from glmv.parsing import ParserConfig, StreamingParser, ToolCallDelta, parse_completion
from tests.parsing.cases import GLM45, THINK_OFF, TOOLS, Case, call, params

T = {"tools": TOOLS}

CASES = [
    # Grammar.
    Case("one-call", call("get_weather", ("city", "Beijing"), ("days", "2")), None, None,
         (("get_weather", {"city": "Beijing", "days": 2}),), kwargs=T,
         arguments=('{"city": "Beijing", "days": 2}',)),
    Case("arguments-json-keeps-unicode", call("get_weather", ("city", "北京")), None, None,
         (("get_weather", {"city": "北京"}),), kwargs=T, arguments=('{"city": "北京"}',)),
    Case("key-order-as-written", call("get_weather", ("days", "1"), ("city", "X")), None, None,
         (("get_weather", {"days": 1, "city": "X"}),), kwargs=T,
         arguments=('{"days": 1, "city": "X"}',)),
    Case("no-newlines", call("get_weather", ("city", "Oslo"), newline=False), None, None,
         (("get_weather", {"city": "Oslo"}),), kwargs=T),
    Case("name-ends-at-literal-backslash-n",
         "<tool_call>get_weather\\n<arg_key>city</arg_key><arg_value>Oslo</arg_value>"
         "</tool_call>", None, None, (("get_weather", {"city": "Oslo"}),), kwargs=T),
    Case("spaces-around-name-key-value",
         "<tool_call>  get_weather \n<arg_key> city </arg_key>\n<arg_value>\n Oslo \n"
         "</arg_value>\n</tool_call>", None, None, (("get_weather", {"city": "Oslo"}),),
         kwargs=T),
    Case("newlines-before-name", "<tool_call>\n\nget_time\n</tool_call>", None, None,
         (("get_time", {}),), kwargs=T),
    Case("zero-args-no-newline", "<tool_call>get_time</tool_call>", None, None,
         (("get_time", {}),), kwargs=T, arguments=("{}",)),
    Case("zero-args-newline", "<tool_call>get_time\n</tool_call>", None, None,
         (("get_time", {}),), kwargs=T, arguments=("{}",)),
    Case("junk-between-args-ignored",
         "<tool_call>get_weather\nxx<arg_key>city</arg_key> yy <arg_value>A</arg_value>zz"
         "</tool_call>", None, None, (("get_weather", {"city": "A"}),), kwargs=T),
    Case("duplicate-key-keeps-first", call("get_weather", ("city", "A"), ("city", "B")),
         None, None, (("get_weather", {"city": "A"}),), kwargs=T),
    Case("empty-key-dropped", call("get_weather", (" ", "A"), ("city", "B")), None, None,
         (("get_weather", {"city": "B"}),), kwargs=T),
    Case("key-without-value-dropped",
         "<tool_call>get_weather\n<arg_key>days</arg_key>\n<arg_key>city</arg_key>"
         "<arg_value>B</arg_value></tool_call>", None, None,
         (("get_weather", {"city": "B"}),), kwargs=T),
    Case("key-cut-by-call-end", "<tool_call>get_weather\n<arg_key>city</tool_call>", None,
         None, (("get_weather", {}),), kwargs=T),
    Case("value-cut-by-call-end",
         "<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>Lima</tool_call>",
         None, None, (("get_weather", {"city": "Lima"}),), kwargs=T),
    Case("next-call-closes-unterminated-call",
         "<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>A</arg_value>\n"
         + call("get_time"), None, None, (("get_weather", {"city": "A"}), ("get_time", {})),
         kwargs=T),
    Case("empty-name-is-not-a-call", "<tool_call>\n</tool_call>after", None,
         "<tool_call>\n</tool_call>after", kwargs=T),
    # Unknown tools and arguments: typed by json.loads, else the raw string.
    Case("unknown-tool",
         call("mystery", ("n", "12"), ("s", "hello"), ("j", '{"a": [1, 2]}'), ("t", "true"),
              ("q", '"quoted"'), ("f", "1.5"), ("x", "[1, 2")),
         None, None, (("mystery", {"n": 12, "s": "hello", "j": {"a": [1, 2]}, "t": True,
                                   "q": "quoted", "f": 1.5, "x": "[1, 2"}),), kwargs=T),
    Case("unknown-arg-of-known-tool", call("get_weather", ("city", "12"), ("extra", "12")),
         None, None, (("get_weather", {"city": "12", "extra": 12}),), kwargs=T),
    Case("no-tools-given", call("get_weather", ("city", "12")), None, None,
         (("get_weather", {"city": 12}),)),
    # Content around calls.
    Case("text-before", "Let me check.\n" + call("get_time"), None, "Let me check.\n",
         (("get_time", {}),), kwargs=T),
    Case("text-between-and-after", "A " + call("get_time") + "\n B " + call("get_time")
         + "  C", None, "A B C", (("get_time", {}), ("get_time", {})), kwargs=T),
    Case("three-calls-in-a-row", call("get_time") + call("get_weather", ("city", "X"))
         + call("get_time"), None, None,
         (("get_time", {}), ("get_weather", {"city": "X"}), ("get_time", {})), kwargs=T),
    Case("stray-call-end-is-text", "a</tool_call>b", None, "a</tool_call>b", kwargs=T),
    Case("arg-tags-outside-call-are-text", "<arg_key>k</arg_key>", None,
         "<arg_key>k</arg_key>", kwargs=T),
    # Cut off by the end of the output: not a call, its raw text is content.
    Case("cut-in-name", "Sure.<tool_call>get_wea", None, "Sure.<tool_call>get_wea",
         kwargs=T),
    Case("cut-after-name", "<tool_call>get_weather\n", None, "<tool_call>get_weather\n",
         kwargs=T),
    Case("cut-in-value", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par",
         None, "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Par", kwargs=T),
    Case("cut-after-value", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris"
         "</arg_value>\n", None,
         "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n",
         kwargs=T),
    Case("cut-second-call", call("get_time") + "\n<tool_call>get_weather\n<arg_key>ci", None,
         "<tool_call>get_weather\n<arg_key>ci", (("get_time", {}),), kwargs=T),
    Case("cut-in-call-end-tag", "<tool_call>get_time\n</tool_ca", None,
         "<tool_call>get_time\n</tool_ca", kwargs=T),
    # tool_choice "none": the tags stay text (and so do box tokens inside them).
    Case("tool-choice-none", "Hi " + call("get_time"), None, "Hi " + call("get_time"),
         kwargs={"tools": TOOLS, "tool_choice": "none"}),
    Case("tool-choice-required", call("get_time"), None, None, (("get_time", {}),),
         kwargs={"tools": TOOLS, "tool_choice": "required"}),
    Case("tool-choice-named", call("get_time"), None, None, (("get_time", {}),),
         kwargs={"tools": TOOLS,
                 "tool_choice": {"type": "function", "function": {"name": "get_time"}}}),
    # The server's prefills (serving_chat.prepare_chat): forced calls.
    Case("prefill-required", "get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome"
         "</arg_value>\n</tool_call>", None, None, (("get_weather", {"city": "Rome"}),),
         kwargs={"tools": TOOLS, "tool_choice": "required", "enable_thinking": False,
                 "prefill": THINK_OFF + "<tool_call>"}),
    Case("prefill-named", "<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>",
         None, None, (("get_weather", {"city": "Rome"}),),
         kwargs={"tools": TOOLS, "enable_thinking": False,
                 "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                 "prefill": THINK_OFF + "<tool_call>get_weather\n"}),
    Case("prefill-named-zero-args", "</tool_call>", None, None, (("get_time", {}),),
         kwargs={"tools": TOOLS, "enable_thinking": False,
                 "prefill": THINK_OFF + "<tool_call>get_time\n"}),
    Case("prefill-call-without-think", "get_time\n</tool_call>", None, None,
         (("get_time", {}),), kwargs={"tools": TOOLS, "prefill": "<tool_call>"}),
    Case("prefill-named-then-more-calls", "<arg_key>city</arg_key><arg_value>A</arg_value>"
         "</tool_call>" + call("get_time"), None, None,
         (("get_weather", {"city": "A"}), ("get_time", {})),
         kwargs={"tools": TOOLS, "enable_thinking": False,
                 "prefill": THINK_OFF + "<tool_call>get_weather\n"}),
    # Values: raw strings for string arguments, whatever they contain.
    Case("value-with-lt-gt", call("get_weather", ("city", "a < b && c > d <x>")), None, None,
         (("get_weather", {"city": "a < b && c > d <x>"}),), kwargs=T),
    Case("value-with-tag-prefix", call("get_weather", ("city", "</arg_val")), None, None,
         (("get_weather", {"city": "</arg_val"}),), kwargs=T),
    Case("value-with-newlines", call("get_weather", ("city", "line 1\nline 2\n\nline 4")),
         None, None, (("get_weather", {"city": "line 1\nline 2\n\nline 4"}),), kwargs=T),
    Case("value-with-quotes", call("get_weather", ("city", 'say "hi" \\ \'x\'')), None, None,
         (("get_weather", {"city": 'say "hi" \\ \'x\''}),), kwargs=T,
         arguments=('{"city": "say \\"hi\\" \\\\ \'x\'"}',)),
    Case("value-json-looking-string", call("get_weather", ("city", '{"a": 1}')), None, None,
         (("get_weather", {"city": '{"a": 1}'}),), kwargs=T),
    Case("value-number-looking-string", call("get_weather", ("city", "007")), None, None,
         (("get_weather", {"city": "007"}),), kwargs=T),
    Case("value-unicode", call("get_weather", ("city", "Zürich 東京 🌧")), None, None,
         (("get_weather", {"city": "Zürich 東京 🌧"}),), kwargs=T),
    Case("value-with-tool-call-tags", call("get_weather", ("city", "<tool_call>x<arg_key>")),
         None, None, (("get_weather", {"city": "<tool_call>x<arg_key>"}),), kwargs=T),
    Case("value-with-think-and-box-tags",
         call("get_weather", ("city", "</think><|begin_of_box|>[1,2,3,4]<|end_of_box|>")),
         None, None,
         (("get_weather", {"city": "</think><|begin_of_box|>[1,2,3,4]<|end_of_box|>"}),),
         kwargs=T),
    Case("value-empty", call("get_weather", ("city", "")), None, None,
         (("get_weather", {"city": ""}),), kwargs=T),
    Case("value-typed-int-bool", call("get_weather", ("city", "X"), ("days", " 3 "),
                                      ("metric", "false")), None, None,
         (("get_weather", {"city": "X", "days": 3, "metric": False}),), kwargs=T),
]


@pytest.mark.parametrize("case", params(CASES))
def test_tool_call_table(case: Case) -> None:
    case.check(parse_completion(case.text, case.config, **case.kwargs))


def test_call_ids_are_openai_style_and_unique() -> None:
    parsed = parse_completion(call("get_time") * 5, GLM45, tools=TOOLS)
    ids = [c.id for c in parsed.tool_calls]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    assert len(set(ids)) == 5


def test_glm41v_never_parses_tools() -> None:
    config = ParserConfig.for_model("glm4v", has_answer_tags=True)
    assert not config.enable_tools
    parsed = parse_completion(call("get_time"), config, tools=TOOLS)
    assert parsed.tool_calls == [] and parsed.content == call("get_time")


def test_arguments_stream_as_pieces_of_the_final_json() -> None:
    """One fragment per finished argument; the name goes out with the id, complete, once."""
    parser = StreamingParser(GLM45, tools=TOOLS)
    pieces = ["<tool_call>get_w", "eather\n<arg_key>city</arg_key>\n<arg_value>Pa",
              "ris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>", "\n</tool",
              "_call>"]
    deltas = [parser.feed(p).tool_calls for p in pieces]
    assert deltas[0] == []  # the name is not complete yet
    [head] = deltas[1]
    assert (head.index, head.name, head.arguments) == (0, "get_weather", "")
    assert deltas[2] == [ToolCallDelta(0, None, None, '{"city": "Paris", "days": 2')]
    assert deltas[3] == []
    assert deltas[4] == [ToolCallDelta(0, None, None, "}")]
    assert parser.finish().is_empty
    assert parser.result().tool_calls[0].arguments == '{"city": "Paris", "days": 2}'


def test_zero_argument_call_streams_name_then_braces() -> None:
    parser = StreamingParser(GLM45, tools=TOOLS)
    [head] = parser.feed("<tool_call>get_time\n").tool_calls
    assert head.name == "get_time" and head.id is not None
    assert parser.feed("</tool_call>").tool_calls == [ToolCallDelta(0, None, None, "{}")]


def test_whole_call_in_one_delta_is_one_entry() -> None:
    parser = StreamingParser(GLM45, tools=TOOLS)
    [entry] = parser.feed(call("get_weather", ("city", "A"))).tool_calls
    assert (entry.name, entry.arguments) == ("get_weather", '{"city": "A"}')
    assert entry.id == parser.result().tool_calls[0].id


def test_named_prefill_streams_the_name_in_the_first_delta() -> None:
    """The server prefills `<tool_call>NAME\\n`: the first delta already names the call."""
    parser = StreamingParser(GLM45, tools=TOOLS, enable_thinking=False,
                             prefill=THINK_OFF + "<tool_call>get_weather\n")
    first = parser.feed("")
    assert [(d.index, d.name) for d in first.tool_calls] == [(0, "get_weather")]
    assert first.content == "" and first.reasoning == ""
    parser.feed("<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>")
    parser.finish()
    assert json.loads(parser.result().tool_calls[0].arguments) == {"city": "Rome"}


def test_cut_off_call_stream_carries_an_extra_last_index() -> None:
    """The documented exception: a call cut off by the end of the output has streamed its id,
    name and finished arguments; the final parse makes its raw text content instead."""
    text = (call("get_time") + "<tool_call>get_weather\n<arg_key>city</arg_key>"
            "<arg_value>Rome</arg_value>\n<arg_key>days</arg_key><arg_value>3")
    parser = StreamingParser(GLM45, tools=TOOLS)
    streamed: dict[int, list[ToolCallDelta]] = {}
    for ch in text:
        for d in parser.feed(ch).tool_calls:
            streamed.setdefault(d.index, []).append(d)
    last = parser.finish()
    result = parser.result()
    assert [c.name for c in result.tool_calls] == ["get_time"]
    assert sorted(streamed) == [0, 1]  # one index more than the result
    assert streamed[1][0].name == "get_weather"
    assert "".join(d.arguments for d in streamed[1]) == '{"city": "Rome"'  # never closed
    assert last.tool_calls == []
    raw = text[len(call("get_time")):]
    assert last.content == raw and result.content == raw
