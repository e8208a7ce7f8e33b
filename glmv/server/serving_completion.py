"""/v1/completions (raw prompts, no template), MindIE's /generate and /tokenize."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import Request

from glmv.engine.outputs import CompletionOutput, RequestOutput
from glmv.errors import EngineError
from glmv.multimodal.processor import ProcessedPrompt
from glmv.sampling_params import SamplingParams
from glmv.server.context import (
    EventStreamResponse,
    ServerContext,
    new_id,
    until_disconnected,
    with_deadline,
)
from glmv.server.errors import HTTPError, error_body, from_exception
from glmv.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    SamplingFields,
    TokenizeRequest,
)
from glmv.server.sampling import build_sampling_params
from glmv.server.serving_chat import prepare_chat
from glmv.server.usage import usage_json


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise HTTPError(400, "prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


def _process(ctx: ServerContext, prompt: str | list[int]) -> ProcessedPrompt:
    if isinstance(prompt, str):
        return ctx.processor.process(prompt)
    return ctx.processor.process_token_ids(prompt)


async def _run_all(ctx: ServerContext, request_id: str, prompts: Sequence[ProcessedPrompt],
                   params: SamplingParams, priority: int) -> list[RequestOutput]:
    async def one(index: int, prompt: ProcessedPrompt) -> RequestOutput:
        arrival = time.monotonic()
        final = await ctx.engine.complete(f"{request_id}-{index}", prompt, params, priority)
        ctx.record_finished(final, arrival)
        return final

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))


def _params(ctx: ServerContext, body: SamplingFields, max_tokens: int | None,
            logprobs: int | None) -> SamplingParams:
    return build_sampling_params(body, ctx.sampling_defaults, max_tokens=max_tokens,
                                 logprobs=logprobs)


async def completion(ctx: ServerContext, body: CompletionRequest,
                     request: Request) -> JSONResponse | EventStreamResponse:
    model = ctx.check_model(body.model)
    if body.suffix:
        raise HTTPError(400, "suffix is not supported by GLM-V models", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise HTTPError(400, "best_of must equal n (glmv returns every completion)", "best_of")
    texts = _prompts(body.prompt)
    prompts = [await ctx.engine.run_media(_process, ctx, p) for p in texts]
    params = _params(ctx, body, body.max_tokens if body.max_tokens is not None else 16,
                     body.logprobs)
    request_id = new_id("cmpl")
    if body.stream:
        return EventStreamResponse(_stream(ctx, body, model, request_id, prompts, params))
    finals = await until_disconnected(
        request, _run_all(ctx, request_id, prompts, params, body.priority),
        ctx.config.request_timeout)
    choices = []
    for p_index, final in enumerate(finals):
        for c in final.outputs:
            choices.append(_choice(ctx, body, final, c, p_index * params.n + c.index))
    usage = _sum_usage([usage_json(f) for f in finals])
    return JSONResponse({"id": request_id, "object": "text_completion",
                         "created": int(time.time()), "model": model, "choices": choices,
                         "usage": usage})


def _choice(ctx: ServerContext, body: CompletionRequest, final: RequestOutput,
            c: CompletionOutput, index: int) -> dict[str, Any]:
    if c.error is not None:
        raise EngineError(c.error)
    prefix = (final.prompt or "") if body.echo else ""
    logprobs = None
    if body.logprobs is not None and c.logprobs is not None:
        logprobs = ctx.completion_logprobs(c.token_ids, c.logprobs, body.logprobs, len(prefix))
    return {"index": index, "text": prefix + c.text, "logprobs": logprobs,
            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}


def _sum_usage(usages: list[dict[str, Any]]) -> dict[str, Any]:
    total = usages[0]
    for u in usages[1:]:
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            total[key] += u[key]
        for key, value in u["prompt_tokens_details"].items():
            total["prompt_tokens_details"][key] += value
    return total


async def _stream(ctx: ServerContext, body: CompletionRequest, model: str, request_id: str,
                  prompts: list[ProcessedPrompt], params: SamplingParams) -> AsyncIterator[str]:
    created = int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    queue: asyncio.Queue[tuple[int, RequestOutput] | None] = asyncio.Queue()
    finals: dict[int, RequestOutput] = {}

    async def pump(index: int, prompt: ProcessedPrompt) -> None:
        arrival = time.monotonic()
        outputs = ctx.engine.generate(f"{request_id}-{index}", prompt, params, body.priority)
        async for output in with_deadline(outputs, ctx.config.request_timeout):
            await queue.put((index, output))
            if output.finished:
                ctx.record_finished(output, arrival)

    tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(prompts)]
    gathered = asyncio.ensure_future(asyncio.gather(*tasks))
    gathered.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        while (item := await queue.get()) is not None:
            p_index, output = item
            finals[p_index] = output
            for c in output.outputs:
                if c.error is not None:
                    raise EngineError(c.error)
                if not c.delta_text and not c.finished:
                    continue
                data: dict[str, Any] = {
                    "id": request_id, "object": "text_completion", "created": created,
                    "model": model, "choices": [{
                        "index": p_index * params.n + c.index, "text": c.delta_text,
                        "logprobs": None, "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason}]}
                if include_usage:
                    data["usage"] = None
                yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
        gathered.result()  # surfaces an error of any prompt
        if include_usage and finals:
            usage = _sum_usage([usage_json(finals[i]) for i in sorted(finals)])
            data = {"id": request_id, "object": "text_completion", "created": created,
                    "model": model, "choices": [], "usage": usage}
            yield f"data: {json.dumps(data)}\n\n"
    except Exception as exc:
        status, message, param = from_exception(exc)
        yield f"data: {json.dumps(error_body(status, message, param))}\n\n"
    finally:
        for task in tasks:
            task.cancel()
    yield "data: [DONE]\n\n"


# -- /tokenize ------------------------------------------------------------------------------

async def tokenize(ctx: ServerContext, body: TokenizeRequest) -> dict[str, Any]:
    """Token count of a prompt or chat request, visual tokens included; no model step."""
    ctx.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise HTTPError(400, "give exactly one of prompt and messages", "messages")
    if body.messages is not None:
        # The very preparation a chat request gets (template, thinking switch, forced tool
        # call prefill, media), so the count is the one the chat request would use.
        chat = ChatCompletionRequest(
            model=body.model, messages=body.messages, tools=body.tools,
            tool_choice=body.tool_choice, chat_template=body.chat_template,
            chat_template_kwargs=body.chat_template_kwargs,
            add_generation_prompt=body.add_generation_prompt)
        prompt = (await prepare_chat(ctx, chat)).prompt
    else:
        prompt = await ctx.engine.run_media(ctx.processor.process, body.prompt or "")
    out: dict[str, Any] = {"count": len(prompt.token_ids),
                           "image_tokens": prompt.num_image_tokens,
                           "video_tokens": prompt.num_video_tokens,
                           "max_model_len": ctx.model.max_model_len}
    if body.return_token_ids:
        out["tokens"] = prompt.token_ids
    return out


# -- MindIE /generate -----------------------------------------------------------------------

async def generate(ctx: ServerContext, body: GenerateRequest,
                   request: Request) -> JSONResponse | EventStreamResponse:
    """MindIE's /generate: {"prompt", flat sampling fields} -> {"text": [completion]}; the
    TGI form {"inputs", "parameters"} -> {"generated_text", "details"}."""
    tgi = body.inputs is not None
    source = body.inputs if tgi else body.prompt
    if source is None:
        raise HTTPError(400, "give prompt (or inputs)", "prompt")
    fields = _generate_fields(body)
    params = build_sampling_params(fields, ctx.sampling_defaults,
                                   max_tokens=fields.max_tokens, logprobs=None)
    if isinstance(source, str):
        prompt = await ctx.engine.run_media(ctx.processor.process, source)
    else:
        messages = [{"role": "user", "content": list(source)}]
        prompt = await ctx.engine.run_media(ctx.processor.process_chat, messages,
                                            chat_template_kwargs=dict(
                                                ctx.config.default_chat_template_kwargs))
    request_id = new_id("generate")
    if body.stream:
        return EventStreamResponse(_generate_stream(ctx, request_id, prompt, params, tgi))
    [final] = await until_disconnected(request, _run_all(ctx, request_id, [prompt], params, 0),
                                       ctx.config.request_timeout)
    c = final.outputs[0]
    if c.error is not None:
        raise EngineError(c.error)
    if tgi:
        details = {"finish_reason": c.finish_reason, "generated_tokens": len(c.token_ids),
                   "prompt_tokens": final.num_prompt_tokens, "seed": params.seed}
        return JSONResponse({"generated_text": c.text, "details": details})
    return JSONResponse({"text": [c.text]})


def _generate_fields(body: GenerateRequest) -> SamplingFields:
    p = body.parameters
    flat: dict[str, Any] = {k: v for k, v in body.model_dump().items()
                            if k in SamplingFields.model_fields and v is not None}
    if p is not None:
        tgi: Mapping[str, Any] = p.model_dump(exclude_none=True)
        for key in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "stop"):
            if key in tgi:
                flat[key] = tgi[key]
        if "max_new_tokens" in tgi:
            flat["max_tokens"] = tgi["max_new_tokens"]
    flat.pop("stream", None)
    flat.setdefault("max_tokens", 64)
    return SamplingFields(**flat)


async def _generate_stream(ctx: ServerContext, request_id: str, prompt: ProcessedPrompt,
                           params: SamplingParams, tgi: bool) -> AsyncIterator[str]:
    arrival = time.monotonic()
    try:
        async for output in with_deadline(ctx.engine.generate(request_id, prompt, params, 0),
                                          ctx.config.request_timeout):
            if output.finished:
                ctx.record_finished(output, arrival)
            c = output.outputs[0]
            if c.error is not None:
                raise EngineError(c.error)
            if tgi:
                data: dict[str, Any] = {
                    "token": {"id": c.delta_token_ids[-1] if c.delta_token_ids else None,
                              "text": c.delta_text, "special": False},
                    "generated_text": c.text if c.finished else None,
                    "details": ({"finish_reason": c.finish_reason,
                                 "generated_tokens": len(c.token_ids)}
                                if c.finished else None)}
            else:
                data = {"text": [c.delta_text], "finish_reason": c.finish_reason}
            yield f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
    except Exception as exc:
        status, message, param = from_exception(exc)
        yield f"data: {json.dumps(error_body(status, message, param))}\n\n"
