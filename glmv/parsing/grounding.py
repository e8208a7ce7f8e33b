"""Grounding boxes: `<|begin_of_box|>…<|end_of_box|>` spans in the content (protocol 3.5).

Decisions, in the order a span is read:

- Only content is searched: a box in the reasoning is the model thinking aloud, not an answer,
  so it gives no Box (its markers are dropped from the reasoning unless `keep_box_tokens`, like
  any special token); box tokens inside tool-call arguments stay in the argument text.
- Span text that is JSON (or a Python literal) holding objects with a `bbox_2d`, `box_2d`,
  `bbox` or `box` field gives one Box per 4-number list in that field, labelled by the object's
  `label` or `name` field (nested lists/objects are searched too).
- Otherwise every group of four numbers (integers or decimals, optionally negative) in
  brackets of any style (`[]`, `[[]]`, `()`, `<>`, `{}`), separated by commas and/or spaces, is a
  box: `[[1,2,3,4],[5,6,7,8]]` gives two. Anything else inside the brackets (`[a,b,c,d]`,
  `[1e3,…]`, five numbers, numbers of more than six digits) is no box; the text stays.
- Points (two numbers, e.g. `[500,300]` or `left_click(start_box='[x,y]')`) are not boxes and
  are skipped: a Box always has four coordinates. A span with no box (`<|begin_of_box|>Paris…`,
  the 4.1V answer highlight) gives none.
- Out-of-range values are kept, not dropped: `coords` keep the model's values (rounded to int
  when written as decimals) even when outside 0..1000 or reversed (x2 < x1): they are what the
  model said (the GUI-agent prompts use 0..999, some replies overshoot by a little). `pixels`
  scale them to the original image (x / 1000 * W, y / 1000 * H) and clamp each into
  [0, W] x [0, H], without reordering, so a drawn box stays inside the image.
- The image: the caller passes the request's image sizes (width, height) in prompt order; boxes
  refer to the LAST image, the one most recently shown (every image of the request comes before
  the reply). With no image, pixels and image_index are None.
- The label, when the span itself names none: the content text just before the span, since the
  last line break, sentence end (. ! ? 。 ！ ？ ; ；) or previous box span, stripped of
  whitespace and separator punctuation, its last 60 characters at most; None if empty. So
  `The cat<|begin_of_box|>[..]<|end_of_box|> and the dog<|begin_of_box|>[..]…` labels "The cat"
  and "and the dog".
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

_BOX_KEYS = ("bbox_2d", "box_2d", "bbox", "box")
_LABEL_KEYS = ("label", "name")
_NUM = r"(-?\d{1,6}(?:\.\d{1,6})?)"  # bounded so no float overflows or huge ints
# A comma and/or whitespace, written so that no run of whitespace can be split two ways: the
# looser `\s*[,\s]\s*` backtracked quadratically over long whitespace runs.
_SEP = r"(?:\s+(?:,\s*)?|,\s*)"
_QUAD = re.compile(r"[\[(<{]\s*" + _SEP.join([_NUM] * 4) + r"\s*[\])>}]")
_SENTENCE_BREAK = re.compile(r"[\n.!?。！？;；]")
_LABEL_STRIP = " \t\r\n,:;，：；、-–—*#\"'`([{"
_LABEL_MAX_LEN = 60
# Bound on the label context kept while streaming: more than a label needs, less than a page.
_CONTEXT_MAX_LEN = 4 * _LABEL_MAX_LEN
_JSON_MAX_DEPTH = 6


@dataclass(frozen=True)
class Box:
    """One grounding box the model wrote, with its position in the original image."""

    coords: tuple[int, int, int, int]  # (x1, y1, x2, y2) on the model's 0-1000 scale, as written
    pixels: tuple[float, float, float, float] | None  # original image, clamped; None: no image
    image_index: int | None  # index into the request's images (the last one); None: no image
    label: str | None  # from a label/name field, else the phrase before the span; None: none
    text: str  # the raw span text between <|begin_of_box|> and <|end_of_box|>


def parse_box_span(text: str, context_label: str | None,
                   image_sizes: Sequence[tuple[int, int]]) -> list[Box]:
    """Every box in one span's text; `context_label` labels boxes that carry no label."""
    found = list(_json_boxes(text)) or [(quad, None) for quad in _bracket_boxes(text)]
    image_index = len(image_sizes) - 1 if image_sizes else None
    size = image_sizes[-1] if image_sizes else None
    return [
        Box(coords=coords, pixels=_to_pixels(coords, size), image_index=image_index,
            label=label if label is not None else context_label, text=text)
        for coords, label in found
    ]


def label_from_context(context: str) -> str | None:
    """The label heuristic: the phrase at the end of `context` (see the module docstring)."""
    breaks = list(_SENTENCE_BREAK.finditer(context))
    phrase = context[breaks[-1].end():] if breaks else context
    phrase = phrase.strip(_LABEL_STRIP)
    if len(phrase) > _LABEL_MAX_LEN:
        phrase = phrase[-_LABEL_MAX_LEN:].strip(_LABEL_STRIP)
    return phrase or None


class BoxTracker:
    """Follows box spans through streamed content; returns the Boxes when a span closes.

    Owns the open span's text and the recent content outside spans (the label context).
    """

    def __init__(self, image_sizes: Sequence[tuple[int, int]]) -> None:
        self._image_sizes = tuple(image_sizes)
        self._span: list[str] | None = None  # text of the open span; None: outside any span
        self._context = ""  # content since the last box span (bounded), for labels

    def text(self, raw: str, emitted: str) -> None:
        """Content text: `raw` as written (for the span), `emitted` as sent (for labels)."""
        if self._span is not None:
            self._span.append(raw)
        else:
            self._context = (self._context + emitted)[-_CONTEXT_MAX_LEN:]

    def begin(self) -> None:
        """`<|begin_of_box|>`: a new span (an unclosed earlier one is abandoned)."""
        self._span = []

    def end(self) -> list[Box]:
        """`<|end_of_box|>`: the boxes of the open span (none when no span is open)."""
        if self._span is None:
            return []
        boxes = parse_box_span("".join(self._span), label_from_context(self._context),
                               self._image_sizes)
        self._span, self._context = None, ""
        return boxes

    def reset(self) -> None:
        """Content was interrupted (a tool call): drop the open span and the label context."""
        self._span, self._context = None, ""


def _bracket_boxes(text: str) -> Iterator[tuple[int, int, int, int]]:
    for match in _QUAD.finditer(text):
        yield _quad([float(g) for g in match.groups()])


def _json_boxes(text: str) -> Iterator[tuple[tuple[int, int, int, int], str | None]]:
    stripped = text.strip()
    if not stripped.startswith(("{", "[")):
        return
    yield from _walk(_load_structure(stripped), None, 0)


def _load_structure(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:  # Python-style dicts ({'label': 'cat', ...}) are common too
        return ast.literal_eval(text) if len(text) < 10_000 else None
    except Exception:  # literal_eval raises many types (SyntaxError, ValueError, MemoryError…)
        return None


def _walk(node: Any, label: str | None,
          depth: int) -> Iterator[tuple[tuple[int, int, int, int], str | None]]:
    if depth > _JSON_MAX_DEPTH:
        return
    if isinstance(node, dict):
        own = next((node[k] for k in _LABEL_KEYS if isinstance(node.get(k), str)), None)
        label = own.strip() or None if isinstance(own, str) else label
        for key in _BOX_KEYS:
            for quad in _quads_in(node.get(key)):
                yield quad, label
        for key, value in node.items():
            if key not in _BOX_KEYS and isinstance(value, (dict, list)):
                yield from _walk(value, label, depth + 1)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, (dict, list)):
                yield from _walk(item, label, depth + 1)


def _quads_in(value: Any) -> Iterator[tuple[int, int, int, int]]:
    """Quads in a box field's value: [a,b,c,d] or a list of them."""
    if _is_quad(value):
        yield _quad(value)
    elif isinstance(value, list):
        for item in value:
            if _is_quad(item):
                yield _quad(item)


def _is_quad(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                    and abs(v) < 1e7 for v in value))


def _quad(values: Sequence[float]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (round(v) for v in values)
    return x1, y1, x2, y2


def _to_pixels(coords: tuple[int, int, int, int],
               size: tuple[int, int] | None) -> tuple[float, float, float, float] | None:
    if size is None:
        return None
    width, height = size
    x1, y1, x2, y2 = coords

    def scale(value: int, extent: int) -> float:
        return min(max(value / 1000 * extent, 0.0), float(extent))

    return scale(x1, width), scale(y1, height), scale(x2, width), scale(y2, height)
