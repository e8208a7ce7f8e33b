"""Reasoning styles: how each GLM-V generation marks its thinking, as a registry of plain data.

Two styles exist (protocol reference, sections 3.1-3.3):

- `glm41v` (GLM-4.1V-9B-Thinking): always thinks. Output is `<think>R</think><answer>A</answer>`,
  with or without newlines between the blocks. The chat template ignores `enable_thinking`, so
  this style does too. The `<answer>` / `</answer>` wrapper is removed from content wherever it
  appears; a missing `<answer>` leaves the text after `</think>` as content, and output cut off
  inside `<answer>` leaves the answer so far as content.
- `glm45` (GLM-4.5V, GLM-4.6V, GLM-4.6V-Flash): hybrid thinking. With thinking on the model
  starts its output with `<think>`; output that does not start with it (after whitespace) is
  taken as "the model skipped thinking" and is all content. With `enable_thinking=False` the
  whole output is content, except that an empty `<think></think>` block at its very start (the
  template's own prefill) is dropped. A `<tool_call>` while still reasoning ends the reasoning
  (a `</think>` written after that call is dropped as markup).

Shared rules (both styles, whole and streamed alike):

- Reasoning is the text between `<think>` and `</think>`, stripped of whitespace at both ends
  (GLM-4.1V writes `<think>\n…\n</think>`; the chat template strips it the same way when the
  turn goes back into a prompt), and is None when empty. Streamed, its trailing whitespace is
  held back until more reasoning text follows. Output cut off inside the reasoning (no
  `</think>`) gives that reasoning and no content. Box markers inside it are dropped unless
  `keep_box_tokens` (no Box is read from reasoning).
- Leading whitespace of the content (after `</think>`, `<answer>`, a tool call, or at the start)
  is dropped; empty content is None.
- Tags that mean nothing where they appear (a stray `</think>` in content, `<answer>` in a
  `glm45` answer) stay in the text as written.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmv.errors import ConfigError
from glmv.parsing.tags import ANSWER_END, ANSWER_START, THINK_END, THINK_START


@dataclass(frozen=True)
class ReasoningStyle:
    """How one model generation opens and closes its reasoning and wraps its answer."""

    name: str  # registry key, the value of ParserConfig.reasoning
    start_tag: str  # opens the reasoning block at the start of the output
    end_tag: str  # closes it; content follows
    honors_enable_thinking: bool  # False: the template ignores enable_thinking, the model thinks
    answer_tags: tuple[str, ...]  # wrapper tags removed from content (empty: none)
    tool_call_ends_reasoning: bool  # a <tool_call> inside the reasoning closes it

    def opener(self, enable_thinking: bool) -> str:
        """What the output must start with to enter (or, thinking off, to skip) the reasoning."""
        if enable_thinking or not self.honors_enable_thinking:
            return self.start_tag
        # Thinking off: the template prefilled an empty block; drop it, never parse reasoning.
        return self.start_tag + self.end_tag

    def thinks(self, enable_thinking: bool) -> bool:
        """Whether a leading `start_tag` opens reasoning (False: everything is content)."""
        return enable_thinking or not self.honors_enable_thinking


REASONING_STYLES: dict[str, ReasoningStyle] = {
    "glm41v": ReasoningStyle(
        name="glm41v", start_tag=THINK_START, end_tag=THINK_END, honors_enable_thinking=False,
        answer_tags=(ANSWER_START, ANSWER_END), tool_call_ends_reasoning=False,
    ),
    "glm45": ReasoningStyle(
        name="glm45", start_tag=THINK_START, end_tag=THINK_END, honors_enable_thinking=True,
        answer_tags=(), tool_call_ends_reasoning=True,
    ),
}


def get_reasoning_style(name: str) -> ReasoningStyle:
    """The registered style called `name`; ConfigError names the known ones otherwise."""
    style = REASONING_STYLES.get(name)
    if style is None:
        raise ConfigError(
            f"unknown reasoning style {name!r}; known: {', '.join(sorted(REASONING_STYLES))}"
        )
    return style
