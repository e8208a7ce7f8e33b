"""ScriptedEngine: the real AsyncEngine front with replies chosen by the test.

A random-weight model cannot be made to write a tool call or a grounding box, so tests of the
server's output parsing script the reply instead: `engine.replies = ["<think>..."]` (one per
choice). The reply is tokenized with the checkpoint's tokenizer and streamed token by token
through the engine's own incremental detokenizer, with the request's sampling parameters, as
the engine would emit it; the request's prompt and parameters are kept for inspection.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from glmv.engine.async_engine import AsyncEngine
from glmv.engine.detokenizer import IncrementalDetokenizer
from glmv.engine.outputs import CompletionOutput, RequestOutput
from glmv.multimodal.processor import ProcessedPrompt
from glmv.sampling_params import SamplingParams


class ScriptedStream:
    def __init__(self, outputs: list[RequestOutput]) -> None:
        self._outputs = iter(outputs)
        self.closed = False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            return next(self._outputs)
        except StopIteration:
            raise StopAsyncIteration from None

    def close(self) -> None:
        self.closed = True


class ScriptedEngine(AsyncEngine):
    """Replies come from `replies`; nothing runs the model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replies: list[str] = ["ok"]
        self.prompts: list[ProcessedPrompt] = []
        self.params: list[SamplingParams] = []

    async def add(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                  priority: int = 0, final_only: bool = False) -> Any:
        self.prompts.append(prompt)
        self.params.append(params)
        outputs = self._outputs(request_id, prompt, params)
        return ScriptedStream(outputs[-1:] if final_only else outputs)

    async def generate(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                       priority: int = 0, final_only: bool = False,
                       ) -> AsyncIterator[RequestOutput]:
        stream = await self.add(request_id, prompt, params, priority, final_only)
        async for output in stream:
            yield output

    def _outputs(self, request_id: str, prompt: ProcessedPrompt,
                 params: SamplingParams) -> list[RequestOutput]:
        tok = self.tokenizer
        scripts = [tok.encode(self.replies[i % len(self.replies)]) for i in range(params.n)]
        detoks = [IncrementalDetokenizer(tok, params.skip_special_tokens, params.stop,
                                         params.include_stop_str_in_output,
                                         params.keep_special_token_ids) for _ in scripts]
        outputs, steps, first_token = [], max(len(s) for s in scripts), time.monotonic()
        for step in range(steps):
            completions = []
            for index, (ids, detok) in enumerate(zip(scripts, detoks, strict=True)):
                new = ids[step:step + 1]
                detok.update(new)
                last = step >= len(ids) - 1
                completions.append(CompletionOutput(
                    index=index, text=detok.output_text, token_ids=ids[:step + 1],
                    finish_reason="stop" if last else None,
                    delta_text=detok.get_delta(finished=last), delta_token_ids=new))
            outputs.append(RequestOutput(
                request_id, prompt.prompt, prompt.token_ids, completions,
                finished=step == steps - 1, num_image_tokens=prompt.num_image_tokens,
                num_video_tokens=prompt.num_video_tokens, first_token_time=first_token))
        return outputs
