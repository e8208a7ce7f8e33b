"""Streaming: for every table row of the other modules and for random text, any split of the
output into deltas gives the same result as the whole parse, field by field (the invariants
are listed in `tests.parsing.streaming`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmv.parsing import ParsedDelta, ParserConfig, StreamingParser, parse_completion
from glmv.parsing.tags import NAME_TERMINATORS, OUTPUT_TAGS
from tests.parsing import test_grounding, test_reasoning, test_tool_calls
from tests.parsing.cases import (
    BOX_END,
    BOX_START,
    CONFIGS,
    GLM45,
    THINK_OFF,
    TOOLS,
    Case,
    call,
)
from tests.parsing.streaming import check_stream, split_at

Row = tuple[str, ParserConfig, dict[str, Any], Case | None]

ROWS: list[Row] = [
    *((c.text, c.config, c.kwargs, c) for c in test_reasoning.CASES),
    *((c.text, c.config, c.kwargs, c) for c in test_tool_calls.CASES),
    *((c.text, CONFIGS[c.model], c.kwargs, None) for c in test_grounding.CASES),
]
ROW_IDS = ([f"reasoning-{c.id}" for c in test_reasoning.CASES]
           + [f"tools-{c.id}" for c in test_tool_calls.CASES]
           + [f"boxes-{c.id}" for c in test_grounding.CASES])
ROW_PARAMS = [pytest.param(*row, id=row_id) for row, row_id in zip(ROWS, ROW_IDS, strict=True)]
ARGS = ("text", "config", "kwargs", "case")


@pytest.mark.parametrize(ARGS, ROW_PARAMS)
def test_every_two_way_split(text: str, config: ParserConfig, kwargs: dict[str, Any],
                             case: Case | None) -> None:
    for cut in range(len(text) + 1):
        result = check_stream(text, [text[:cut], text[cut:]], config, **kwargs)
        if case is not None:
            case.check(result)


@pytest.mark.parametrize(ARGS, ROW_PARAMS)
def test_one_char_at_a_time(text: str, config: ParserConfig, kwargs: dict[str, Any],
                            case: Case | None) -> None:
    result = check_stream(text, list(text), config, **kwargs)
    if case is not None:
        case.check(result)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=st.sampled_from(ROWS), cuts=st.lists(st.integers(0, 400), max_size=25))
def test_random_splits_of_table_rows(row: Row, cuts: list[int]) -> None:
    text, config, kwargs, case = row
    result = check_stream(text, split_at(text, cuts), config, **kwargs)
    if case is not None:
        case.check(result)


# Random output: tags, pieces of tags, and the characters the parsers look at.
FRAGMENTS = [
    *OUTPUT_TAGS, *NAME_TERMINATORS,
    *(tag[:n] for tag in OUTPUT_TAGS for n in (1, 2, 5)),
    *"abcxyz0123456789 \n\t,.:[](){}<>|/\\\"'-", "get_weather", "get_time", "city", "days",
    "[1,2,3,4]", "[[100, 200, 300, 400]]", "(5 6 7 8)", "12", "true", '{"a": 1}', "北京", "🌧",
    "<tool_call>get_weather\n", "<arg_key>city</arg_key>", "<arg_value>Rome</arg_value>",
]
texts = st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join)
parse_kwargs = st.fixed_dictionaries({
    "enable_thinking": st.booleans(),
    "tools": st.sampled_from([None, TOOLS]),
    "tool_choice": st.sampled_from(["auto", "none", "required", None]),
    "image_sizes": st.sampled_from([[], [(640, 480)], [(10, 10), (2000, 1000)]]),
    "keep_box_tokens": st.booleans(),
    "prefill": st.sampled_from(["", THINK_OFF, "<think>", THINK_OFF + "<tool_call>",
                                "<tool_call>get_weather\n", "<tool_call>get_wea"]),
})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, model=st.sampled_from(sorted(CONFIGS)), kwargs=parse_kwargs,
       cuts=st.lists(st.integers(0, 300), max_size=20))
def test_random_text_random_splits(text: str, model: str, kwargs: dict[str, Any],
                                   cuts: list[int]) -> None:
    check_stream(text, split_at(text, cuts), CONFIGS[model], **kwargs)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200), model=st.sampled_from(sorted(CONFIGS)),
       kwargs=parse_kwargs, cuts=st.lists(st.integers(0, 200), max_size=10))
def test_arbitrary_unicode_never_raises(text: str, model: str, kwargs: dict[str, Any],
                                        cuts: list[int]) -> None:
    check_stream(text, split_at(text, cuts), CONFIGS[model], **kwargs)


# ---------------------------------------------------------------------- hold-back of tags


@pytest.mark.parametrize(("pieces", "deltas"), [
    (["abc<|begin_of", "_box|>[1,2,3,4]<|end_of_box|>"], ["abc", "[1,2,3,4]"]),
    (["abc<", "b"], ["abc", "<b"]),  # not a tag after all: released with the next delta
    (["abc<thi"], ["abc"]),  # held until finish()
    (["x</", "tool_call>y"], ["x", "</tool_call>y"]),  # a stray tag is text, but never halved
    (["a\\", "nb"], ["a\\", "nb"]),  # backslash-n ends a name only inside a tool call
    (["a ", " b"], ["a ", " b"]),  # content whitespace is not held
], ids=["box-start", "false-alarm", "until-finish", "stray-tag", "backslash", "spaces"])
def test_content_deltas_hold_back_partial_tags(pieces: list[str], deltas: list[str]) -> None:
    parser = StreamingParser(GLM45)
    got = [parser.feed(p).content for p in pieces]
    assert got == deltas
    assert "".join(got) + parser.finish().content == parser.result().content


def test_reasoning_deltas_hold_back_partial_tags_and_trailing_whitespace() -> None:
    parser = StreamingParser(GLM45)
    got = [parser.feed(p) for p in ["<thi", "nk>\nStep one.\n", "\nStep two.</th", "ink>\nA"]]
    assert [d.reasoning for d in got] == ["", "Step one.", "\n\nStep two.", ""]
    assert [d.content for d in got] == ["", "", "", "A"]
    assert parser.finish().is_empty
    assert parser.result().reasoning == "Step one.\n\nStep two."


def test_prefill_output_comes_with_the_first_delta() -> None:
    parser = StreamingParser(GLM45, prefill="<think>", enable_thinking=True)
    first = parser.feed("Hmm")
    assert (first.reasoning, first.content) == ("Hmm", "")


def test_prefill_alone_then_finish() -> None:
    parser = StreamingParser(GLM45, tools=TOOLS, prefill="<tool_call>get_time\n")
    last = parser.finish()
    assert [d.name for d in last.tool_calls] == ["get_time"]
    # Cut off right after the prefill: no call in the result, its text is content.
    assert parser.result().tool_calls == []
    assert parser.result().content == "<tool_call>get_time\n"


def test_parser_lifecycle() -> None:
    parser = StreamingParser(GLM45, tools=TOOLS)
    assert parser.feed("").is_empty
    assert not parser.feed("<think>R</think>A").is_empty
    assert parser.result().reasoning == "R"  # partial results are readable at any time
    last = parser.finish()
    assert last.is_empty and parser.finish().is_empty
    with pytest.raises(RuntimeError, match="after finish"):
        parser.feed("more")
    assert parser.result().content == "A"


def test_empty_delta_properties() -> None:
    assert ParsedDelta("", "", [], []).is_empty
    assert not ParsedDelta(" ", "", [], []).is_empty


# ---------------------------------------------------------------------- cost


def test_whole_parse_of_many_tags() -> None:
    """Slicing the buffer after every tag once made this quadratic (8000 boxes took 30 s; now
    a fraction of a second, which the suite's run time shows)."""
    box = f"a{BOX_START}[1,2,3,4]{BOX_END}"
    args = "".join(f"<arg_key>k{i}</arg_key><arg_value>v</arg_value>" for i in range(8000))
    texts = [
        "<think>" + box * 8000 + "</think>" + box * 8000,
        "<tool_call>f\n" + args + "</tool_call>",
        "<tool_call>f\n<arg_key>k</arg_key><arg_value>" + "<think>" * 50_000 + "</tool_call>",
        call("get_time") * 3000,
    ]
    results = [parse_completion(text, GLM45, tools=TOOLS) for text in texts]
    assert len(results[0].boxes) == 8000  # the boxes after </think>; those in reasoning aren't
    assert len(json.loads(results[1].tool_calls[0].arguments)) == 8000
    assert len(results[3].tool_calls) == 3000


def test_streaming_many_small_deltas() -> None:
    text = ("<think>" + "thinking " * 2000 + "</think>" + f"x{BOX_START}[1,2,3,4]{BOX_END}" * 500
            + call("get_weather", ("city", "y" * 5000)))
    parser = StreamingParser(GLM45, tools=TOOLS)
    for i in range(0, len(text), 3):
        parser.feed(text[i:i + 3])
    parser.finish()
    assert len(parser.result().boxes) == 500
