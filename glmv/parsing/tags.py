"""The literal tags of GLM-V output and the scanner helpers that find them in streamed text.

Model output reaches the parsers detokenized with special tokens kept, so every tag below appears
as this exact string. A streamed delta may end in the middle of a tag (`<|begin_of`), so the
helpers also say how much of a buffer's tail could still grow into a tag and must be held back.
"""

from __future__ import annotations

import re
from functools import lru_cache

THINK_START = "<think>"
THINK_END = "</think>"
ANSWER_START = "<answer>"
ANSWER_END = "</answer>"
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
ARG_KEY_START = "<arg_key>"
ARG_KEY_END = "</arg_key>"
ARG_VALUE_START = "<arg_value>"
ARG_VALUE_END = "</arg_value>"
BOX_START = "<|begin_of_box|>"
BOX_END = "<|end_of_box|>"

# Every tag the parsers act on. All of them are held back while incomplete in every state (a
# state that has no use for a tag then emits it as plain text), so no client ever sees half a tag.
OUTPUT_TAGS: tuple[str, ...] = (
    THINK_START, THINK_END, ANSWER_START, ANSWER_END, TOOL_CALL_START, TOOL_CALL_END,
    ARG_KEY_START, ARG_KEY_END, ARG_VALUE_START, ARG_VALUE_END, BOX_START, BOX_END,
)
# What ends a tool name besides `<arg_key>` / `</tool_call>`: a newline, or the two characters
# backslash-n that some GLM generations write instead.
NAME_TERMINATORS: tuple[str, ...] = ("\n", "\\n")


@lru_cache(maxsize=16)
def tag_pattern(tags: tuple[str, ...]) -> re.Pattern[str]:
    """A regex finding the earliest of `tags` (the longest one on a tie) in one pass.

    Scanning with `pattern.search(text, pos)` from a moving position keeps a whole-text parse
    linear in the text length however many tags it holds.
    """
    ordered = sorted(set(tags), key=len, reverse=True)  # longest first: wins at the same index
    return re.compile("|".join(re.escape(tag) for tag in ordered))


@lru_cache(maxsize=16)
def _proper_prefixes(tags: tuple[str, ...]) -> frozenset[str]:
    return frozenset(tag[:n] for tag in tags for n in range(1, len(tag)))


def held_prefix_len(text: str, tags: tuple[str, ...], start: int = 0) -> int:
    """Length of the longest tail of `text[start:]` that is a proper prefix of one of `tags`.

    That tail may still become a tag when the next delta arrives, so it must not be emitted yet.
    """
    prefixes = _proper_prefixes(tags)
    longest = max((len(tag) for tag in tags), default=1) - 1
    for size in range(min(longest, len(text) - start), 0, -1):
        if text[-size:] in prefixes:
            return size
    return 0
