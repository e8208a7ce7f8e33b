"""/v1/chat/completions: messages -> prompt -> engine -> parsed message (or a stream of deltas).

    body --prepare--> ChatPlan (prompt, sampling params, parser settings, prefill)
         --engine--> RequestOutput(s) --glmv.parsing--> reasoning / content / tool_calls / boxes

Tool choice "required" or a named function is enforced by prefilling the assistant turn with
`<tool_call>` (and the name): the model then has to write a call. Thinking is skipped in that
case (an empty `<think></think>` is prefilled), as GLM's template does when thinking is off.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request

from glmv.engine.outputs import CompletionOutput, RequestOutput
from glmv.errors import EngineError
from glmv.multimodal.processor import ProcessedPrompt
from glmv.parsing import ParsedCompletion, StreamingParser, parse_completion
from glmv.sampling_params import SamplingParams
from glmv.server.context import (
    EventStreamResponse,
    ServerContext,
    new_id,
    until_disconnected,
    with_deadline,
)
from glmv.server.errors import HTTPError, error_body, from_exception
from glmv.server.protocol import ChatCompletionRequest, ChatMessage
from glmv.server.sampling import build_sampling_params
from glmv.server.usage import (
    box_json,
    reasoning_tokens,
    tool_call_delta_json,
    tool_call_json,
    usage_json,
)

_THINK_OFF = "<think></think>\n"


@dataclass
class ChatPlan:
    """Everything decided about one chat request before it reaches the engine."""

    request_id: str
    model: str
    prompt: ProcessedPrompt
    params: SamplingParams
    parser_kwargs: dict[str, Any]  # for parse_completion / StreamingParser
    thinking: bool  # the reasoning span is open to the model
    top_logprobs: int | None  # None: no logprobs
    arrival: float = field(default_factory=time.monotonic)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> the plain dicts the chat template expects (tool-call arguments
    decoded from their JSON string, `developer` treated as `system`)."""
    out = []
    for index, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        if item["role"] == "developer":
            item["role"] = "system"
        item.setdefault("content", "")
        for call in item.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, Mapping) else None
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                raise HTTPError(400, "each tool call needs function.name",
                                f"messages[{index}].tool_calls")
            arguments = function.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError as exc:
                    raise HTTPError(400, f"tool call arguments are not JSON: {exc.msg}",
                                    f"messages[{index}].tool_calls") from None
            if not isinstance(arguments, Mapping):
                raise HTTPError(400, "tool call arguments must be a JSON object",
                                f"messages[{index}].tool_calls")
            call["function"] = {**function, "arguments": dict(arguments)}
        out.append(item)
    return out


def _forced_call(ctx: ServerContext, body: ChatCompletionRequest,
                 tools: list[dict[str, Any]] | None) -> str | None:
    """The tool name a request forces ("" = any tool, None = not forced)."""
    choice = body.tool_choice
    if choice is None or choice in ("auto", "none"):
        return None
    if not tools:
        raise HTTPError(400, "tool_choice requires tools", "tool_choice")
    if choice == "required":
        return ""
    if not isinstance(choice, Mapping):
        raise HTTPError(400, f"tool_choice {choice!r} is not supported", "tool_choice")
    # Any JSON may stand where a function object belongs: only objects with a string name count.
    name = _function_name(choice)
    if name is None:
        raise HTTPError(400, 'tool_choice must be "none", "auto", "required" or {"type": '
                             '"function", "function": {"name": ...}}', "tool_choice")
    names = [_function_name(t) for t in tools]
    if name not in names:
        raise HTTPError(400, f"tool_choice names {name!r}, which is not among the tools",
                        "tool_choice")
    return name


def _function_name(item: Mapping[str, Any]) -> str | None:
    """`item["function"]["name"]` when it is a string, else None."""
    function = item.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    return name if isinstance(name, str) else None


async def prepare_chat(ctx: ServerContext, body: ChatCompletionRequest) -> ChatPlan:
    """Validate the request, render and preprocess its prompt (media in the worker pool)."""
    model = ctx.check_model(body.model)
    if body.response_format and body.response_format.get("type") not in (None, "text"):
        raise HTTPError(400, "response_format other than text is not supported",
                        "response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise HTTPError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    if body.chat_template is not None and not ctx.config.trust_request_chat_template:
        raise HTTPError(400, "this server does not run chat templates sent with requests "
                             "(start it with --trust-request-chat-template to allow them)",
                        "chat_template")
    kwargs = {**ctx.config.default_chat_template_kwargs, **(body.chat_template_kwargs or {})}
    tool_choice = body.tool_choice if body.tool_choice is not None else "auto"
    tools = body.tools if body.tools and tool_choice != "none" else None
    if tools and not ctx.model.supports_tools:
        raise HTTPError(400, f"this model ({ctx.model.model_type}, GLM-4.1V family) does not "
                             "support tools", "tools")
    forced = _forced_call(ctx, body, tools)
    thinking = not (ctx.model.hybrid_thinking and kwargs.get("enable_thinking") is False)
    prefill = "" if thinking else _THINK_OFF
    extra = ""
    if forced is not None:
        extra = (_THINK_OFF if thinking and ctx.model.hybrid_thinking else "") + "<tool_call>"
        extra += f"{forced}\n" if forced else ""
        thinking = False
    prompt, seconds = await ctx.engine.run_media(
        _process_chat, ctx, template_messages(body.messages), tools, body, kwargs, extra)
    ctx.metrics.media_seconds.observe(seconds)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = build_sampling_params(
        body, ctx.sampling_defaults, max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=logprobs, thinking_budget=body.thinking_budget,
        keep_special_token_ids=ctx.model.box_token_ids)
    sizes = [(item.original_size[1], item.original_size[0]) for item in prompt.mm_items
             if item.modality == "image" and item.original_size is not None]
    # Like vLLM, tool calls are parsed only for requests that offer tools.
    parser_kwargs = {"enable_thinking": thinking, "tools": tools,
                     "tool_choice": tool_choice if tools else "none",
                     "image_sizes": sizes, "keep_box_tokens": not body.skip_special_tokens,
                     "prefill": prefill + extra}
    return ChatPlan(new_id("chatcmpl"), model, prompt, params, parser_kwargs, thinking,
                    logprobs)


def _process_chat(ctx: ServerContext, messages: list[dict[str, Any]],
                  tools: list[dict[str, Any]] | None, body: ChatCompletionRequest,
                  kwargs: dict[str, Any], prefill: str) -> tuple[ProcessedPrompt, float]:
    """Runs in the media pool: template, fetch, decode, preprocess; and how long it took."""
    started = time.monotonic()
    prompt = ctx.processor.process_chat(
        messages, tools=tools, chat_template=body.chat_template or ctx.config.chat_template,
        chat_template_kwargs=kwargs, add_generation_prompt=body.add_generation_prompt,
        assistant_prefill=prefill)
    return prompt, time.monotonic() - started


# -- non-streaming --------------------------------------------------------------------------

async def chat_completion(ctx: ServerContext, body: ChatCompletionRequest,
                          request: Request) -> JSONResponse | EventStreamResponse:
    plan = await prepare_chat(ctx, body)
    if body.stream:
        return EventStreamResponse(stream_chat(ctx, body, plan))
    final = await until_disconnected(
        request, ctx.engine.complete(plan.request_id, plan.prompt, plan.params),
        ctx.config.request_timeout)
    ctx.record_finished(final, plan.arrival)
    return JSONResponse(_response(ctx, plan, final))


def _finish_reason(completion: CompletionOutput, parsed_calls: bool) -> str | None:
    if completion.finish_reason == "stop" and parsed_calls:
        return "tool_calls"
    return completion.finish_reason


def _response(ctx: ServerContext, plan: ChatPlan, final: RequestOutput) -> dict[str, Any]:
    choices, reasoning = [], 0
    for completion in final.outputs:
        if completion.error is not None:
            raise EngineError(completion.error)
        parsed = parse_completion(completion.text, ctx.parser_config, **plan.parser_kwargs)
        reasoning += reasoning_tokens(ctx, completion, parsed, plan.thinking)
        choice: dict[str, Any] = {
            "index": completion.index,
            "message": _message(parsed),
            "logprobs": None,
            "finish_reason": _finish_reason(completion, bool(parsed.tool_calls)),
            "stop_reason": completion.stop_reason,
        }
        if plan.top_logprobs is not None and completion.logprobs is not None:
            choice["logprobs"] = {"content": ctx.chat_logprobs(
                completion.token_ids, completion.logprobs, plan.top_logprobs)}
        choices.append(choice)
    return {"id": plan.request_id, "object": "chat.completion", "created": int(time.time()),
            "model": plan.model, "choices": choices,
            "usage": usage_json(final, reasoning)}


def _message(parsed: ParsedCompletion) -> dict[str, Any]:
    return {"role": "assistant", "content": parsed.content,
            "reasoning_content": parsed.reasoning,
            "tool_calls": [tool_call_json(call) for call in parsed.tool_calls],
            "boxes": [box_json(box) for box in parsed.boxes]}


# -- streaming ------------------------------------------------------------------------------

def _sse(data: Mapping[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_chat(ctx: ServerContext, body: ChatCompletionRequest,
                      plan: ChatPlan) -> AsyncIterator[str]:
    """SSE chunks: a role chunk per choice, then deltas, finish reasons, usage, [DONE]."""
    n = plan.params.n
    parsers = [StreamingParser(ctx.parser_config, **plan.parser_kwargs) for _ in range(n)]
    called = [False] * n
    done = [False] * n
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> str:
        data: dict[str, Any] = {"id": plan.request_id, "object": "chat.completion.chunk",
                                "created": created, "model": plan.model, "choices": choices}
        if include_usage:
            data["usage"] = usage
        return _sse(data)

    final: RequestOutput | None = None
    try:
        for index in range(n):
            yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        handle = await ctx.engine.add(plan.request_id, plan.prompt, plan.params, 0)
        try:
            async for output in with_deadline(handle, ctx.config.request_timeout):
                final = output
                choices = []
                for completion in output.outputs:
                    i = completion.index
                    if done[i]:
                        continue
                    choice = _delta_choice(ctx, plan, parsers[i], completion, called)
                    if completion.finished:
                        done[i] = True
                    if choice is not None:
                        choices.append(choice)
                if choices:
                    yield chunk(choices)
        finally:
            handle.close()
        if final is not None:
            ctx.record_finished(final, plan.arrival)
            if include_usage:
                # The streaming parsers hold each choice's final parse already.
                reasoning = sum(reasoning_tokens(ctx, c, parsers[c.index].result(),
                                                 plan.thinking) for c in final.outputs)
                yield chunk([], usage_json(final, reasoning))
    except Exception as exc:  # the stream has started: report the error in-band
        status, message, param = from_exception(exc)
        yield _sse(error_body(status, message, param))
    yield "data: [DONE]\n\n"


def _delta_choice(ctx: ServerContext, plan: ChatPlan, parser: StreamingParser,
                  completion: CompletionOutput, called: list[bool]) -> dict[str, Any] | None:
    if completion.error is not None:
        raise EngineError(completion.error)
    deltas = [parser.feed(completion.delta_text)]
    if completion.finished:
        deltas.append(parser.finish())
    out: dict[str, Any] = {}
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    calls = [c for d in deltas for c in d.tool_calls]
    boxes = [b for d in deltas for b in d.boxes]
    if reasoning:
        out["reasoning_content"] = reasoning
    if content:
        out["content"] = content
    if calls:
        called[completion.index] = True
        out["tool_calls"] = [tool_call_delta_json(c) for c in calls]
    if boxes:
        out["boxes"] = [box_json(box) for box in boxes]
    logprobs = None
    new_ids = completion.delta_token_ids
    if plan.top_logprobs is not None and completion.logprobs and new_ids:
        logprobs = {"content": ctx.chat_logprobs(
            new_ids, completion.logprobs[-len(new_ids):], plan.top_logprobs)}
    if not out and logprobs is None and not completion.finished:
        return None
    reason = (_finish_reason(completion, called[completion.index])
              if completion.finished else None)
    return {"index": completion.index, "delta": out, "logprobs": logprobs,
            "finish_reason": reason,
            **({"stop_reason": completion.stop_reason} if completion.finished else {})}
