"""The tag scanner helpers: earliest tag in one pass, and the tail to hold back."""

from __future__ import annotations

import pytest

from glmv.parsing.tags import NAME_TERMINATORS, OUTPUT_TAGS, held_prefix_len, tag_pattern


@pytest.mark.parametrize(("text", "found"), [
    ("abc", None),
    ("a<think>b</think>", (1, "<think>")),
    ("x</think><think>", (1, "</think>")),
    ("<|begin_of<|begin_of_box|>", (10, "<|begin_of_box|>")),
    ("<arg_key<arg_key>", (8, "<arg_key>")),
], ids=["none", "first", "earliest-wins", "after-a-false-start", "nested-prefix"])
def test_tag_pattern_finds_the_earliest_tag(text: str, found: tuple[int, str] | None) -> None:
    match = tag_pattern(OUTPUT_TAGS).search(text)
    assert (None if match is None else (match.start(), match.group())) == found


def test_tag_pattern_prefers_the_longest_tag_at_one_position() -> None:
    match = tag_pattern(("\\", "\\n", "ab")).search("x\\ny")
    assert match is not None and match.group() == "\\n"
    name_tags = OUTPUT_TAGS + NAME_TERMINATORS
    assert [m.group() for m in tag_pattern(name_tags).finditer("f\\n\n<arg_key>")] == [
        "\\n", "\n", "<arg_key>"]


@pytest.mark.parametrize(("text", "start", "held"), [
    ("abc", 0, 0),
    ("abc<", 0, 1),
    ("abc<|begin_of_bo", 0, 13),
    ("abc<think>", 0, 0),  # a complete tag is not a prefix
    ("abc</arg_valu", 0, 10),
    ("a<thi", 1, 4),
    ("a<thi", 2, 0),  # only text[start:] may be held: "thi" is no tag prefix
    ("a<thi", 5, 0),
    ("<tool_call", 0, 10),
], ids=["plain", "lt", "box", "complete", "arg-value", "from-1", "from-2", "empty-rest",
        "call"])
def test_held_prefix_len(text: str, start: int, held: int) -> None:
    assert held_prefix_len(text, OUTPUT_TAGS, start) == held


def test_backslash_is_held_only_where_backslash_n_is_a_tag() -> None:
    assert held_prefix_len("get_weather\\", OUTPUT_TAGS + NAME_TERMINATORS) == 1
    assert held_prefix_len("get_weather\\", OUTPUT_TAGS) == 0
