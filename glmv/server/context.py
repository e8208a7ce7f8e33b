"""What every route needs: the engine, the served names, the model's parsers and defaults."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from glmv.engine.async_engine import AsyncEngine
from glmv.engine.outputs import PositionLogprobs, RequestOutput
from glmv.parsing import ParserConfig
from glmv.server.config import ServerConfig
from glmv.server.errors import HTTPError
from glmv.server.metrics import ServerMetrics
from glmv.server.sampling import SamplingDefaults

T = TypeVar("T")
#: JSON cannot hold -inf; OpenAI-compatible servers send this floor instead.
_MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class ModelInfo:
    """What the served checkpoint can do, read from its tokenizer and config."""

    model_type: str
    hybrid_thinking: bool  # GLM-4.5V/4.6V family: thinking can be switched off
    supports_tools: bool  # the template renders tools and the tokenizer has <tool_call>
    max_model_len: int
    box_token_ids: tuple[int, ...]  # grounding markers kept in text for the parser


class ServerContext:
    """Shared state of one server; routes are thin functions over it."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig, model_name: str) -> None:
        self.engine = engine
        self.config = config
        self.names = config.served_model_names or (model_name,)
        self.tokenizer = engine.tokenizer
        self.processor = engine.processor
        special = self.tokenizer.special
        llm = engine.engine
        self.model = ModelInfo(
            model_type=llm.config.model_type,
            hybrid_thinking=special.answer is None,
            supports_tools=special.tool_call is not None,
            max_model_len=llm.scheduler_config.max_model_len,
            box_token_ids=tuple(t for t in (special.begin_of_box, special.end_of_box)
                                if t is not None))
        self.parser_config = ParserConfig.for_model(
            llm.config.model_type, has_answer_tags=special.answer is not None)
        self.sampling_defaults = SamplingDefaults.from_generation_config(llm.model_path)
        self.metrics = ServerMetrics(lambda: engine.stats, lambda: engine.num_unfinished)
        self.created = int(time.time())
        self.draining = False  # set on SIGTERM/SIGINT: new requests are refused with 503

    @property
    def model_name(self) -> str:
        return self.names[0]

    def capabilities(self) -> dict[str, Any]:
        """What a client (the chat page) may send: the model's features and the media limits."""
        policy = self.processor.media_policy
        return {
            "model_type": self.model.model_type,
            "thinking": "hybrid" if self.model.hybrid_thinking else "always",
            "tools": self.model.supports_tools,
            "limit_mm_per_prompt": dict(policy.limit_per_prompt),
            "max_media_bytes": policy.max_bytes,
            "max_image_pixels": policy.max_image_pixels,
            "max_document_pages": policy.max_document_pages,
        }

    def check_model(self, name: str | None) -> str:
        """The served name a request asks for (None = the default); 404 otherwise."""
        if name is None or name == "":
            return self.model_name
        if name not in self.names:
            raise HTTPError(404, f"the model {name!r} does not exist; this server serves "
                                 f"{', '.join(repr(n) for n in self.names)}", "model")
        return name

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_logprobs(self, token_ids: list[int], positions: list[PositionLogprobs],
                      top: int) -> list[dict[str, Any]]:
        """OpenAI chat `logprobs.content` entries for these tokens."""
        entries = []
        for token_id, position in zip(token_ids, positions, strict=False):
            entries.append({**self._logprob_entry(token_id, position[token_id].logprob),
                            "top_logprobs": [self._logprob_entry(t, lp.logprob)
                                             for t, lp in _top(position, top)]})
        return entries

    def _logprob_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_text(token_id)
        return {"token": text, "logprob": max(logprob, _MIN_LOGPROB),
                "bytes": list(text.encode("utf-8"))}

    def completion_logprobs(self, token_ids: list[int], positions: list[PositionLogprobs],
                            top: int, offset: int) -> dict[str, Any]:
        """OpenAI completions `logprobs` (tokens, token_logprobs, top_logprobs, text_offset)."""
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for token_id, position in zip(token_ids, positions, strict=False):
            text = self.token_text(token_id)
            tokens.append(text)
            token_logprobs.append(max(position[token_id].logprob, _MIN_LOGPROB))
            tops.append({self.token_text(t): max(lp.logprob, _MIN_LOGPROB)
                         for t, lp in _top(position, top)})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
                "text_offset": offsets}

    def record_finished(self, output: RequestOutput, arrival: float) -> None:
        """Token counters and latency histograms of a finished request."""
        m, now, first_token = self.metrics, time.monotonic(), output.first_token_time
        m.prompt_tokens.inc(output.num_prompt_tokens)
        m.visual_tokens.labels("image").inc(output.num_image_tokens)
        m.visual_tokens.labels("video").inc(output.num_video_tokens)
        m.cached_tokens.inc(output.num_cached_tokens)
        generated = sum(len(c.token_ids) for c in output.outputs)
        m.generation_tokens.inc(generated)
        for completion in output.outputs:
            m.requests_finished.labels(completion.finish_reason or "unknown").inc()
        m.e2e.observe(now - arrival)
        if first_token is not None:
            m.ttft.observe(first_token - arrival)
            longest = max((len(c.token_ids) for c in output.outputs), default=0)
            if longest > 1:
                m.tpot.observe((now - first_token) / (longest - 1))


def _top(position: PositionLogprobs, top: int) -> list[tuple[int, Any]]:
    ranked = sorted(position.items(), key=lambda item: item[1].rank)
    return [(t, lp) for t, lp in ranked if lp.rank <= top][:top]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ClientDisconnected(Exception):
    """The client went away before the response was ready."""


async def until_disconnected(request: Request, work: Awaitable[T],
                             timeout: float | None = None) -> T:
    """Await `work`, cancelling it (and so aborting its engine request) if the client
    disconnects or `timeout` passes."""
    task = asyncio.ensure_future(work)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected
            if deadline is not None and time.monotonic() > deadline:
                raise request_timeout_error(timeout)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def request_timeout_error(timeout: float | None) -> HTTPError:
    return HTTPError(408, f"the request ran longer than {timeout:g} s (--request-timeout)")


async def with_deadline(outputs: AsyncIterator[RequestOutput],
                        timeout: float | None) -> AsyncIterator[RequestOutput]:
    """`outputs` until `timeout` seconds have passed, then a 408 (the stream paths' form of
    --request-timeout; an async generator given here is closed, which aborts its request)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                if deadline is None:
                    output = await outputs.__anext__()
                else:
                    output = await asyncio.wait_for(outputs.__anext__(),
                                                    max(deadline - time.monotonic(), 0.001))
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise request_timeout_error(timeout) from None
            yield output
    finally:
        if isinstance(outputs, AsyncGenerator):
            await outputs.aclose()


class EventStreamResponse(StreamingResponse):
    """A server-sent-event response whose generator is always closed when the response ends.

    Starlette stops iterating a stream when the client goes away but does not close it: if
    the stop caught the stream waiting in `send` (which, under the HTTP middleware, is often),
    the generator stays suspended at a `yield` with its engine request still counted in flight
    until the garbage collector happens to finalize it, seconds to minutes later. Closing it
    here runs its `finally` at once, which releases (aborts) the request.
    """

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream")
        self._events = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if isinstance(self._events, AsyncGenerator):
                await self._events.aclose()
