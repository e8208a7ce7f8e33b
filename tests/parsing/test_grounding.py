"""Grounding boxes (protocol 3.5): `<|begin_of_box|>…<|end_of_box|>` spans in the content, their
coordinates in every bracket style, pixels in the last image, labels, and the box tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from glmv.parsing import Box, StreamingParser, parse_completion
from glmv.parsing.grounding import label_from_context, parse_box_span
from tests.parsing.cases import BOX_END, BOX_START, GLM41V, GLM45, TOOLS, call

B, E = BOX_START, BOX_END
IMG = [(2000, 1000)]  # (width, height): x pixels = x / 1000 * 2000, y = y / 1000 * 1000


@dataclass(frozen=True)
class BoxCase:
    id: str
    text: str
    coords: list[tuple[int, int, int, int]]  # expected boxes, in order
    content: str | None = None  # expected content (None: not checked)
    labels: list[str | None] | None = None  # expected labels (None: not checked)
    kwargs: dict[str, Any] = field(default_factory=lambda: {"image_sizes": IMG})
    model: str = "glm45"


CASES = [
    # Bracket styles.
    BoxCase("double-brackets", f"The cat{B}[[100,200,300,400]]{E}", [(100, 200, 300, 400)],
            "The cat[[100,200,300,400]]", ["The cat"]),
    BoxCase("single-brackets", f"{B}[100,200,300,400]{E}", [(100, 200, 300, 400)]),
    BoxCase("parentheses", f"{B}(100,200,300,400){E}", [(100, 200, 300, 400)]),
    BoxCase("braces", f"{B}{{100,200,300,400}}{E}", [(100, 200, 300, 400)]),
    BoxCase("angle-brackets", f"{B}<100,200,300,400>{E}", [(100, 200, 300, 400)]),
    BoxCase("spaces", f"{B}[ [ 100 , 200 ,300, 400 ] ]{E}", [(100, 200, 300, 400)]),
    BoxCase("space-separated", f"{B}[100 200 300 400]{E}", [(100, 200, 300, 400)]),
    BoxCase("newlines-inside", f"{B}[\n100,\n200,\n300,\n400\n]{E}", [(100, 200, 300, 400)]),
    BoxCase("decimals-rounded", f"{B}[100.4,200.6,300,400.5]{E}", [(100, 201, 300, 400)]),
    BoxCase("two-boxes-one-span", f"{B}[[1,2,3,4],[5,6,7,8]]{E}", [(1, 2, 3, 4), (5, 6, 7, 8)]),
    BoxCase("two-boxes-no-outer", f"{B}[1,2,3,4] [5,6,7,8]{E}", [(1, 2, 3, 4), (5, 6, 7, 8)]),
    BoxCase("two-spans", f"The cat{B}[[1,2,3,4]]{E} and the dog {B}[[5,6,7,8]]{E}.",
            [(1, 2, 3, 4), (5, 6, 7, 8)], "The cat[[1,2,3,4]] and the dog [[5,6,7,8]].",
            ["The cat", "and the dog"]),
    BoxCase("text-around-coords", f"{B}box: [1, 2, 3, 4] (approx){E}", [(1, 2, 3, 4)]),
    # JSON objects with a box field and a label.
    BoxCase("json-label-objects",
            f'{B}[{{"label": "cat", "bbox_2d": [1,2,3,4]}}, {{"label": "dog", '
            f'"bbox_2d": [5,6,7,8]}}]{E}', [(1, 2, 3, 4), (5, 6, 7, 8)], labels=["cat", "dog"]),
    BoxCase("python-dict-label", f"{B}{{'name': 'cup', 'box': [1, 2, 3, 4]}}{E}",
            [(1, 2, 3, 4)], labels=["cup"]),
    BoxCase("gui-action-json", f'Action: {B}{{"action_type": "click", "box_2d": [[10,20,30,40]]}}'
            f"{E}", [(10, 20, 30, 40)], labels=["Action"]),
    BoxCase("json-without-box-field-falls-back", f'{B}{{"coords": [1,2,3,4]}}{E}',
            [(1, 2, 3, 4)]),
    # Not boxes: the text stays, no Box.
    BoxCase("point-is-no-box", f"Click {B}[500,300]{E}", [], "Click [500,300]"),
    BoxCase("gui-point-action", f"{B}left_click(start_box='[100,200]'){E}", [],
            "left_click(start_box='[100,200]')"),
    BoxCase("letters", f"{B}[a,b,c,d]{E}", [], "[a,b,c,d]"),
    BoxCase("garbage", f"{B}[1,,2,3,4]{E}", [], "[1,,2,3,4]"),
    BoxCase("five-numbers", f"{B}[1,2,3,4,5]{E}", [], "[1,2,3,4,5]"),
    BoxCase("exponent", f"{B}[1e3,2,3,4]{E}", []),
    BoxCase("seven-digits", f"{B}[1234567,2,3,4]{E}", []),
    BoxCase("no-brackets", f"{B}1,2,3,4{E}", []),
    BoxCase("answer-highlight", f"The answer is {B}Paris{E}.", [], "The answer is Paris."),
    BoxCase("empty-span", f"a{B}{E}b", [], "ab"),
    BoxCase("unclosed-span", f"a{B}[1,2,3,4]", [], "a[1,2,3,4]"),
    BoxCase("end-without-begin", f"a{E}[1,2,3,4]{E}", [], "a[1,2,3,4]"),
    BoxCase("span-restarted", f"{B}[1,2,3,4]{B}[5,6,7,8]{E}", [(5, 6, 7, 8)]),
    # Out of range: kept as written (pixels clamped, see test_pixels).
    BoxCase("out-of-range-kept", f"{B}[-10,200,1300,400]{E}", [(-10, 200, 1300, 400)]),
    BoxCase("reversed-kept", f"{B}[300,400,100,200]{E}", [(300, 400, 100, 200)]),
    # Where boxes are read: content only.
    BoxCase("box-in-reasoning-is-no-box", f"<think>It is at {B}[1,2,3,4]{E}.</think>Here.",
            [], "Here."),
    BoxCase("box-after-reasoning", f"<think>R</think>\nThe cat{B}[1,2,3,4]{E}",
            [(1, 2, 3, 4)], "The cat[1,2,3,4]", ["The cat"]),
    BoxCase("box-in-tool-args-is-no-box", call("get_weather", ("city", f"{B}[1,2,3,4]{E}")),
            [], None, kwargs={"tools": TOOLS}),
    BoxCase("box-with-tool-choice-none", "<tool_call>x " + f"{B}[1,2,3,4]{E}", [(1, 2, 3, 4)],
            "<tool_call>x [1,2,3,4]", kwargs={"tools": TOOLS, "tool_choice": "none"}),
    BoxCase("glm41v-answer-box", f"<think>R</think><answer>It is here {B}[[1,2,3,4]]{E}"
            "</answer>", [(1, 2, 3, 4)], "It is here [[1,2,3,4]]", ["It is here"],
            model="glm41v"),
    # keep_box_tokens: the markers stay in the content; boxes are still read.
    BoxCase("keep-box-tokens", f"The cat{B}[1,2,3,4]{E}", [(1, 2, 3, 4)],
            f"The cat{B}[1,2,3,4]{E}", ["The cat"], kwargs={"keep_box_tokens": True}),
    BoxCase("keep-box-tokens-reasoning", f"<think>{B}x{E}</think>A", [], "A",
            kwargs={"keep_box_tokens": True}),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_box_table(case: BoxCase) -> None:
    config = GLM41V if case.model == "glm41v" else GLM45
    parsed = parse_completion(case.text, config, **case.kwargs)
    assert [b.coords for b in parsed.boxes] == case.coords
    if case.content is not None:
        assert parsed.content == case.content
    if case.labels is not None:
        assert [b.label for b in parsed.boxes] == case.labels


def test_box_fields() -> None:
    parsed = parse_completion(f"<think>R</think>The cat{B}[[100,200,300,400]]{E}", GLM45,
                              image_sizes=[(640, 480), (2000, 1000)])
    assert parsed.boxes == [Box(coords=(100, 200, 300, 400), pixels=(200.0, 200.0, 600.0, 400.0),
                                image_index=1, label="The cat", text="[[100,200,300,400]]")]


@pytest.mark.parametrize(("sizes", "coords", "pixels", "index"), [
    ([(2000, 1000)], (100, 200, 300, 400), (200.0, 200.0, 600.0, 400.0), 0),
    ([(10, 10), (64, 32), (200, 100)], (500, 500, 1000, 1000), (100.0, 50.0, 200.0, 100.0), 2),
    ([(1000, 1000)], (0, 0, 1000, 1000), (0.0, 0.0, 1000.0, 1000.0), 0),
    ([(2000, 1000)], (-10, 200, 1300, 1001), (0.0, 200.0, 2000.0, 1000.0), 0),  # clamped
    ([(2000, 1000)], (300, 400, 100, 200), (600.0, 400.0, 200.0, 200.0), 0),  # not reordered
    ([(333, 77)], (1, 999, 500, 3), (0.333, 76.923, 166.5, 0.231), 0),
    ([], (1, 2, 3, 4), None, None),  # no image: no pixels
], ids=["one-image", "last-image", "full-image", "clamped", "reversed", "fractional",
        "no-image"])
def test_pixels(sizes: list[tuple[int, int]], coords: tuple[int, int, int, int],
                pixels: tuple[float, ...] | None, index: int | None) -> None:
    [box] = parse_box_span(str(list(coords)), None, sizes)
    assert box.coords == coords and box.image_index == index
    if pixels is None:
        assert box.pixels is None
    else:
        assert box.pixels == pytest.approx(pixels, abs=1e-3)


@pytest.mark.parametrize(("context", "label"), [
    ("The cat", "The cat"),
    ("I see two animals. The cat", "The cat"),
    ("Objects:\n- the red cup: ", "the red cup"),
    ("第一只猫。左边的狗", "左边的狗"),
    ("Here: ", "Here"),
    ("", None),
    ("Done.\n", None),
    ("x" * 100, "x" * 60),
    ("**bold label** (", "bold label"),
], ids=["plain", "after-sentence", "list-item", "cjk", "colon", "empty", "line-start",
        "long", "markdown"])
def test_label_from_context(context: str, label: str | None) -> None:
    assert label_from_context(context) == label


def test_label_context_is_reset_by_a_tool_call() -> None:
    text = "The cat " + call("get_time") + f"{B}[1,2,3,4]{E}"
    [box] = parse_completion(text, GLM45, tools=TOOLS).boxes
    assert box.label is None


def test_box_arrives_in_the_delta_that_closes_it() -> None:
    parser = StreamingParser(GLM45, image_sizes=IMG)
    first = parser.feed(f"The cat{B}[1,2,3,4]")
    assert first.boxes == [] and first.content == "The cat[1,2,3,4]"
    second = parser.feed(f"{E} and")
    assert [b.coords for b in second.boxes] == [(1, 2, 3, 4)]
    assert second.content == " and"


def test_no_box_markers_left_in_reasoning_unless_kept() -> None:
    text = f"<think>near {B}[1,2,3,4]{E} there</think>A"
    assert parse_completion(text, GLM45).reasoning == "near [1,2,3,4] there"
    kept = parse_completion(text, GLM45, keep_box_tokens=True)
    assert kept.reasoning == f"near {B}[1,2,3,4]{E} there" and kept.boxes == []


def test_long_whitespace_inside_a_span() -> None:
    """The coordinate regex once backtracked quadratically over whitespace runs (these inputs
    then took minutes; now milliseconds, which the suite's run time shows)."""
    for text in ("[1" + " " * 50_000 + "x", "[1, 2" + " " * 50_000 + "x",
                 "(" + "1 " * 30_000):
        assert parse_box_span(text, None, IMG) == []
