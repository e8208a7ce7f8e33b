"""Parsing GLM-V output: reasoning, tool calls and grounding boxes, whole or streamed.

Pure Python (level 1 of the dependency layering: imports only `glmv.errors` and the standard
library), usable without the server:

    from glmv.parsing import ParserConfig, parse_completion

    config = ParserConfig.for_model("glm4v_moe", has_answer_tags=False)
    parsed = parse_completion(text, config, tools=tools, image_sizes=[(1280, 720)])

`StreamingParser` gives the same result as deltas (`feed()` per detokenized piece, then
`finish()`). The rules live in the docstrings of `completion`, `reasoning`, `tool_calls`,
`tool_args` and `grounding`.
"""

from glmv.parsing.completion import (
    ParsedCompletion,
    ParsedDelta,
    StreamingParser,
    parse_completion,
)
from glmv.parsing.config import ParserConfig
from glmv.parsing.grounding import Box
from glmv.parsing.reasoning import REASONING_STYLES, ReasoningStyle
from glmv.parsing.tool_calls import ToolCall, ToolCallDelta

__all__ = [
    "REASONING_STYLES",
    "Box",
    "ParsedCompletion",
    "ParsedDelta",
    "ParserConfig",
    "ReasoningStyle",
    "StreamingParser",
    "ToolCall",
    "ToolCallDelta",
    "parse_completion",
]
