"""JSON pieces shared by the serving modules: usage, tool calls, boxes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from glmv.engine.outputs import CompletionOutput, RequestOutput
from glmv.parsing import Box, ParsedCompletion, ToolCall, ToolCallDelta

if TYPE_CHECKING:
    from glmv.server.context import ServerContext


def usage_json(output: RequestOutput, reasoning_tokens: int = 0) -> dict[str, Any]:
    """OpenAI usage, with the prompt's visual and cached tokens and the reasoning tokens."""
    completion = sum(len(c.token_ids) for c in output.outputs)
    return {
        "prompt_tokens": output.num_prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": output.num_prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": output.num_cached_tokens,
                                  "image_tokens": output.num_image_tokens,
                                  "video_tokens": output.num_video_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def reasoning_tokens(ctx: ServerContext, completion: CompletionOutput,
                     parsed: ParsedCompletion, thinking: bool) -> int:
    """Output tokens spent reasoning: those before the first </think> (all of them when the
    reply was cut off while still reasoning)."""
    if not thinking or parsed.reasoning is None:
        return 0
    end = ctx.tokenizer.special.end_think
    ids = completion.token_ids
    return ids.index(end) if end in ids else len(ids)


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}


def tool_call_delta_json(delta: ToolCallDelta) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": delta.arguments}
    if delta.name is not None:
        function["name"] = delta.name
    head: dict[str, Any] = {"index": delta.index}
    if delta.id is not None:
        head.update(id=delta.id, type="function")
    return {**head, "function": function}


def box_json(box: Box) -> dict[str, Any]:
    return {"box": list(box.coords), "pixels": list(box.pixels) if box.pixels else None,
            "image_index": box.image_index, "label": box.label, "text": box.text}
