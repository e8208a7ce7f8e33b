"""The combined parser: reasoning, tool calls and boxes out of one completion, whole or streamed.

`parse_completion` is `StreamingParser` fed the whole text at once, so the whole result and any
stream of deltas come from the same state machine and agree by construction:

    START --<think>--> REASONING --</think>--> CONTENT <--</tool_call>-- CALL
      |                     |                     |                      ^
      +--(anything else)----+-------------------- + ------<tool_call>----+
                  (REASONING -> CALL only where the style says a tool call ends reasoning)

Input is model output detokenized with special tokens kept; stop tokens are not in it.

- `prefill`: assistant text already in the prompt (`<think></think>\\n` when the server turned
  thinking off, `<tool_call>get_weather\\n` when it forces a named call). The parse is of
  prefill + text; in streaming, what the prefill yields is carried into the first delta that
  `feed()` (or `finish()`) returns.
- Tool calls are parsed when the config enables tools and `tool_choice` is not "none" ("auto",
  "required", None and a named-function dict all parse; the server enforces required/named with
  the prefill). With "none" the tags stay in the text. `tools` only types the arguments.
- Content is all text outside reasoning and tool calls, in order: text before, between and
  after calls is joined (leading whitespace after each call dropped). A `<tool_call>` cut off by
  the end of the output is not a tool call: its raw text goes to the content verbatim at
  `finish()`. Streaming has already sent that call's name and finished arguments by then, so a
  stream may carry one extra, last tool-call index that the final result does not have.
- A `<tool_call>` inside the reasoning (glm45) ends the reasoning; a `</think>` the model
  writes after that call is markup and dropped (once), the text after the call is content.
- Box markers are removed from content and reasoning unless `keep_box_tokens` (they are special
  tokens the client would not see with `skip_special_tokens`); the span text stays. Each Box
  is emitted in the delta where its `<|end_of_box|>` arrives.
- A streamed delta never ends inside a tag: a tail that may still grow into one is held back
  until the next delta or `finish()`. Trailing whitespace of the reasoning is held back too.
- Cost is linear in the text length, whole or streamed, however many tags it holds.

See `reasoning`, `tool_calls` and `grounding` for the rules of each part. Parsing never raises:
unbalanced, nested or unknown tags end up as text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from glmv.parsing.config import ParserConfig
from glmv.parsing.grounding import Box, BoxTracker
from glmv.parsing.reasoning import ReasoningStyle, get_reasoning_style
from glmv.parsing.tags import (
    BOX_END,
    BOX_START,
    OUTPUT_TAGS,
    TOOL_CALL_START,
    held_prefix_len,
    tag_pattern,
)
from glmv.parsing.tool_args import ToolSchemas
from glmv.parsing.tool_calls import ToolCall, ToolCallBuilder, ToolCallDelta

ToolChoice = str | Mapping[str, Any] | None


@dataclass(frozen=True)
class ParsedCompletion:
    """A whole completion split into its parts (the OpenAI message fields plus boxes)."""

    reasoning: str | None  # text between <think> and </think>; None when absent or empty
    content: str | None  # the answer, tool calls and markup removed; None when empty
    tool_calls: list[ToolCall]  # complete calls in output order
    boxes: list[Box]  # grounding boxes found in the content, in order


@dataclass(frozen=True)
class ParsedDelta:
    """What one streamed piece of output adds; fields concatenate to the ParsedCompletion."""

    reasoning: str  # new reasoning text ("" when none)
    content: str  # new content text ("" when none)
    tool_calls: list[ToolCallDelta]  # at most one entry per call index
    boxes: list[Box]  # boxes whose <|end_of_box|> arrived in this piece

    @property
    def is_empty(self) -> bool:
        """Nothing to send to the client."""
        return not (self.reasoning or self.content or self.tool_calls or self.boxes)


@dataclass
class _Pending:
    """Output produced since the last delta was handed out."""

    reasoning: list[str] = field(default_factory=list)
    content: list[str] = field(default_factory=list)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)

    def take(self) -> ParsedDelta:
        delta = ParsedDelta("".join(self.reasoning), "".join(self.content),
                            _merge_by_index(self.tool_calls), list(self.boxes))
        self.reasoning, self.content, self.tool_calls, self.boxes = [], [], [], []
        return delta


class _State(Enum):
    START = "start"  # nothing decided yet: does the output open with the reasoning tag?
    REASONING = "reasoning"
    CONTENT = "content"
    CALL = "call"  # inside <tool_call>


class StreamingParser:
    """Incremental parser of one completion: `feed()` each detokenized delta, then `finish()`.

    Owns the parse state of one request. Invariant (for any split of the same text): the deltas
    concatenate to `result()` field by field (reasoning, content, per-index tool-call name and
    arguments, boxes), apart from the cut-off-call exception described in the module docstring.
    """

    def __init__(self, config: ParserConfig, *, enable_thinking: bool = True,
                 tools: Sequence[Mapping[str, Any]] | None = None,
                 tool_choice: ToolChoice = "auto",
                 image_sizes: Sequence[tuple[int, int]] = (),
                 keep_box_tokens: bool = False, prefill: str = "") -> None:
        self._style: ReasoningStyle | None = (
            get_reasoning_style(config.reasoning) if config.reasoning is not None else None
        )
        self._enable_thinking = enable_thinking
        self._tools_on = config.enable_tools and tool_choice != "none"
        self._schemas = ToolSchemas(tools if self._tools_on else None)
        self._keep_box_tokens = keep_box_tokens
        self._boxes = BoxTracker(image_sizes)
        self._state = _State.START if self._style is not None else _State.CONTENT
        self._at_boundary = True  # content not started since a boundary: drop its whitespace
        self._buffer = ""  # text not processed yet (a possible tag prefix, or START's wait)
        self._reasoning_ws = ""  # trailing whitespace of the reasoning so far, held back
        self._think_closed_by_call = False  # a tool call ended the reasoning before </think>
        self._call: ToolCallBuilder | None = None
        self._pending = _Pending()
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._tool_calls: list[ToolCall] = []
        self._all_boxes: list[Box] = []
        self._finished = False
        self._tag_handlers: dict[_State, Callable[[str], None]] = {
            _State.REASONING: self._reasoning_tag,
            _State.CONTENT: self._content_tag,
            _State.CALL: self._call_tag,
        }
        if prefill:
            self._buffer = prefill
            self._process(final=False)

    def feed(self, delta: str) -> ParsedDelta:
        """Parse the next piece of output; what it completes (plus any prefill output)."""
        if self._finished:
            raise RuntimeError("StreamingParser.feed() called after finish()")
        self._buffer += delta
        self._process(final=False)
        return self._pending.take()

    def finish(self) -> ParsedDelta:
        """The output ended: flush held-back text and an unterminated tool call. Idempotent."""
        if not self._finished:
            self._process(final=True)
            if self._call is not None:
                # Cut off inside a call: not a tool call; its text goes to the content as written.
                self._emit_content(self._call.raw)
                self._call = None
            self._finished = True
        return self._pending.take()

    def result(self) -> ParsedCompletion:
        """Everything parsed so far (the final parse once `finish()` has run)."""
        return ParsedCompletion(
            reasoning="".join(self._reasoning) or None,
            content="".join(self._content) or None,
            tool_calls=list(self._tool_calls),
            boxes=list(self._all_boxes),
        )

    # ----------------------------------------------------------------- scanning

    def _process(self, final: bool) -> None:
        if self._state is _State.START and not self._start(final):
            return
        # One left-to-right pass with a moving position (slicing the rest off after each tag
        # made a whole-text parse quadratic in the number of tags).
        buffer, pos = self._buffer, 0
        while True:
            tags = self._call.tags if self._call is not None else OUTPUT_TAGS
            match = tag_pattern(tags).search(buffer, pos)
            if match is None:
                end = len(buffer) if final else len(buffer) - held_prefix_len(buffer, tags, pos)
                self._on_text(buffer[pos:end])
                self._buffer = buffer[end:]
                return
            self._on_text(buffer[pos:match.start()])
            pos = match.end()
            self._tag_handlers[self._state](match.group())

    def _start(self, final: bool) -> bool:
        """Decide whether the output opens with reasoning; False: wait for more text."""
        assert self._style is not None
        self._buffer = self._buffer.lstrip()  # whitespace before the first text is never kept
        opener = self._style.opener(self._enable_thinking)
        if not self._buffer:
            return False
        if self._buffer.startswith(opener):
            self._buffer = self._buffer[len(opener):]
            thinks = self._style.thinks(self._enable_thinking)
            self._state = _State.REASONING if thinks else _State.CONTENT
            return True
        if opener.startswith(self._buffer) and not final:
            return False
        self._state = _State.CONTENT
        return True

    def _on_text(self, text: str) -> None:
        if not text:
            return
        if self._state is _State.REASONING:
            self._emit_reasoning(text)
        elif self._state is _State.CALL:
            assert self._call is not None
            self._call.on_text(text)
        else:
            self._content_text(text)

    # ----------------------------------------------------------------- tags per state

    def _reasoning_tag(self, tag: str) -> None:
        assert self._style is not None
        if tag == self._style.end_tag:
            self._reasoning_ws = ""
            self._state, self._at_boundary = _State.CONTENT, True
        elif tag == TOOL_CALL_START and self._tools_on and self._style.tool_call_ends_reasoning:
            self._reasoning_ws = ""
            self._think_closed_by_call = True
            self._open_call()
        elif tag in (BOX_START, BOX_END) and not self._keep_box_tokens:
            pass  # special tokens the client did not ask for; no boxes are read in reasoning
        else:
            self._emit_reasoning(tag)

    def _content_tag(self, tag: str) -> None:
        if tag == TOOL_CALL_START and self._tools_on:
            self._boxes.reset()
            self._open_call()
        elif tag == BOX_START:
            self._box_marker(tag)
            self._boxes.begin()
        elif tag == BOX_END:
            self._box_marker(tag)
            boxes = self._boxes.end()
            self._all_boxes += boxes
            self._pending.boxes += boxes
        elif self._style is not None and tag in self._style.answer_tags:
            pass  # the 4.1V answer wrapper is markup, not content
        elif (self._think_closed_by_call and self._style is not None
              and tag == self._style.end_tag):
            # The `</think>` owed by reasoning that a tool call already ended: markup.
            self._think_closed_by_call = False
        else:
            self._content_text(tag)

    def _call_tag(self, tag: str) -> None:
        call = self._call
        assert call is not None
        if tag == TOOL_CALL_START and not call.in_value:
            # The previous call lacks its </tool_call>: close it and open the next one.
            self._emit_tool_deltas(call.close())
            self._end_call()
            self._open_call()
            return
        self._emit_tool_deltas(call.on_tag(tag))
        if call.done:
            self._end_call()

    # ----------------------------------------------------------------- helpers

    def _open_call(self) -> None:
        self._call = ToolCallBuilder(len(self._tool_calls), self._schemas)
        self._state = _State.CALL

    def _end_call(self) -> None:
        call = self._call
        assert call is not None
        result = call.result()
        if result is not None:
            self._tool_calls.append(result)
        else:
            self._emit_content(call.raw)  # not a call (no name): keep the text as written
        self._call = None
        self._state, self._at_boundary = _State.CONTENT, True

    def _content_text(self, raw: str) -> None:
        emitted = raw.lstrip() if self._at_boundary else raw
        self._emit_content(emitted)
        self._boxes.text(raw, emitted)

    def _box_marker(self, tag: str) -> None:
        if self._keep_box_tokens:
            self._emit_content(tag)

    def _emit_reasoning(self, text: str) -> None:
        """Reasoning text, stripped of whitespace at both ends of the reasoning block.

        Leading whitespace is dropped while nothing was emitted; trailing whitespace is held
        back until more reasoning text follows, and dropped when the reasoning ends.
        """
        text = self._reasoning_ws + text
        if not self._reasoning:
            text = text.lstrip()
        body = text.rstrip()
        self._reasoning_ws = text[len(body):]
        if body:
            self._reasoning.append(body)
            self._pending.reasoning.append(body)

    def _emit_content(self, text: str) -> None:
        if text:
            self._at_boundary = False
            self._content.append(text)
            self._pending.content.append(text)

    def _emit_tool_deltas(self, deltas: list[ToolCallDelta]) -> None:
        self._pending.tool_calls += deltas


def parse_completion(text: str, config: ParserConfig, *, enable_thinking: bool = True,
                     tools: Sequence[Mapping[str, Any]] | None = None,
                     tool_choice: ToolChoice = "auto",
                     image_sizes: Sequence[tuple[int, int]] = (),
                     keep_box_tokens: bool = False, prefill: str = "") -> ParsedCompletion:
    """Parse one whole completion (`prefill` + `text`); never raises on any text."""
    parser = StreamingParser(config, enable_thinking=enable_thinking, tools=tools,
                             tool_choice=tool_choice, image_sizes=image_sizes,
                             keep_box_tokens=keep_box_tokens, prefill=prefill)
    parser.feed(text)
    parser.finish()
    return parser.result()


def _merge_by_index(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Join consecutive deltas of the same call into one (its id/name kept from the first)."""
    merged: list[ToolCallDelta] = []
    for delta in deltas:
        if merged and merged[-1].index == delta.index:
            prev = merged[-1]
            merged[-1] = ToolCallDelta(
                prev.index,
                prev.id if prev.id is not None else delta.id,
                prev.name if prev.name is not None else delta.name,
                prev.arguments + delta.arguments,
            )
        else:
            merged.append(delta)
    return merged
