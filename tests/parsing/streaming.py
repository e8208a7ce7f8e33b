"""The streaming-invariant harness shared by the parsing tests.

`check_stream(text, chunks, config, **kwargs)` feeds `chunks` (pieces that concatenate to
`text`) to a StreamingParser, then checks every invariant a client relies on:

- reasoning deltas concatenate to `result().reasoning`, content deltas to `result().content`;
- per tool-call index: the first delta carries the id and the complete name (id and name appear
  on no later delta), the argument fragments concatenate to the final `arguments`, which is
  valid JSON; indexes appear in order 0, 1, 2, ...;
- the stream carries at most one index more than the result (a call cut off by the end of the
  output), and only as its last index;
- boxes of all deltas == result boxes;
- no tag straddles a delta boundary in the streamed reasoning or content (no delta ends with half
  a tag that the next one completes);
- `result()` equals `parse_completion` of the whole text (ids aside).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field, replace
from typing import Any

from glmv.parsing import (
    ParsedCompletion,
    ParsedDelta,
    ParserConfig,
    StreamingParser,
    ToolCall,
    parse_completion,
)
from glmv.parsing.tags import OUTPUT_TAGS


@dataclass
class StreamedCall:
    """What the deltas of one tool-call index added up to."""

    id: str | None = None
    name: str | None = None
    arguments: str = ""
    heads: int = 0  # deltas that carried an id or a name


@dataclass
class Streamed:
    """The deltas of one stream, concatenated per field."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    calls: dict[int, StreamedCall] = field(default_factory=dict)
    boxes: list[Any] = field(default_factory=list)

    def add(self, delta: ParsedDelta) -> None:
        self.reasoning.append(delta.reasoning)
        self.content.append(delta.content)
        self.boxes += delta.boxes
        seen: set[int] = set()
        for d in delta.tool_calls:
            assert d.index not in seen, f"two entries for index {d.index} in one delta"
            seen.add(d.index)
            call = self.calls.get(d.index)
            if call is None:
                assert d.index == len(self.calls), f"index {d.index} skipped ahead"
                assert d.id is not None and d.name, "first delta of a call lacks id/name"
                call = self.calls[d.index] = StreamedCall(d.id, d.name)
            else:
                assert d.id is None and d.name is None, "id/name sent twice"
            call.heads += d.id is not None or d.name is not None
            call.arguments += d.arguments


def split_at(text: str, cuts: list[int]) -> list[str]:
    """`text` cut at the given positions (sorted, deduplicated, ends dropped)."""
    points = [0, *sorted({c for c in cuts if 0 < c < len(text)}), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(points)]


def _no_straddling_tag(pieces: list[str]) -> None:
    joined = "".join(pieces)
    bounds, pos = [], 0
    for piece in pieces[:-1]:
        pos += len(piece)
        bounds.append(pos)
    for tag in OUTPUT_TAGS:
        start = joined.find(tag)
        while start >= 0:
            inner = [b for b in bounds if start < b < start + len(tag)]
            assert not inner, f"{tag!r} at {start} split by a delta boundary in {pieces!r}"
            start = joined.find(tag, start + 1)


def without_ids(result: ParsedCompletion) -> ParsedCompletion:
    return replace(result, tool_calls=[replace(c, id="") for c in result.tool_calls])


def check_stream(text: str, chunks: list[str], config: ParserConfig,
                 **kwargs: Any) -> ParsedCompletion:
    """Feed `chunks`, check every invariant (module docstring); the final result."""
    assert "".join(chunks) == text
    parser = StreamingParser(config, **kwargs)
    streamed = Streamed()
    for chunk in chunks:
        streamed.add(parser.feed(chunk))
    last = parser.finish()
    streamed.add(last)
    assert parser.finish().is_empty  # idempotent
    result = parser.result()

    assert ("".join(streamed.reasoning) or None) == result.reasoning
    assert ("".join(streamed.content) or None) == result.content
    _no_straddling_tag(streamed.reasoning)
    _no_straddling_tag(streamed.content)
    assert streamed.boxes == result.boxes

    n = len(result.tool_calls)
    assert len(streamed.calls) in (n, n + 1), (streamed.calls, result.tool_calls)
    for index, call in enumerate(result.tool_calls):
        got = streamed.calls[index]
        assert (got.id, got.name, got.arguments) == (call.id, call.name, call.arguments)
        assert got.heads == 1
        assert isinstance(json.loads(call.arguments), dict)
    if len(streamed.calls) == n + 1:
        # The documented exception: a call cut off by the end of the output was streamed (name,
        # finished arguments), but finish() turns its raw text into content instead.
        extra = streamed.calls[n]
        assert extra.name is not None
        assert "<tool_call>" in last.content and extra.name in last.content
        assert result.content is not None and result.content.endswith(last.content)

    whole = parse_completion(text, config, **kwargs)
    assert without_ids(whole) == without_ids(result)
    return result


def char_chunks(text: str) -> list[str]:
    return list(text)


def tool_calls_json(calls: list[ToolCall]) -> list[tuple[str, Any]]:
    """(name, decoded arguments) per call, for readable assertions."""
    return [(c.name, json.loads(c.arguments)) for c in calls]
