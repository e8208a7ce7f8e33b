"""The offline API, shaped like vLLM's: `LLM(model=...).generate(...)` / `.chat(...)`.

Every prompt of one call is added to the engine before the first step, so a list of prompts or
conversations runs as one continuously batched workload. Outputs come back in input order.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from tqdm.auto import tqdm

from glmv.engine.config import EngineArgs
from glmv.engine.llm_engine import LLMEngine
from glmv.engine.outputs import RequestOutput
from glmv.errors import PromptError
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import ProcessedPrompt
from glmv.sampling_params import SamplingParams
from glmv.tokenizer import Tokenizer

#: A prompt for `generate`: text, token ids, or a dict ({"prompt": text, "multi_modal_data":
#: {"image": ..., "video": ...}} or {"prompt_token_ids": [...]}).
PromptInput = str | Sequence[int] | Mapping[str, Any]
Messages = Sequence[Mapping[str, Any]]


class LLM:
    """A model loaded for offline batch inference.

    Keyword arguments are the fields of `EngineArgs` (max_model_len, max_num_seqs,
    kv_cache_memory, dtype, device, ...). Media in prompts may come from any local path, data
    URL or http(s) URL unless `media_policy` says otherwise.
    """

    def __init__(self, model: str = "demo", *, media_policy: MediaPolicy | None = None,
                 **engine_kwargs: Any) -> None:
        args = EngineArgs(model=model, **engine_kwargs)
        self.llm_engine = LLMEngine.from_args(args, media_policy or MediaPolicy.local())
        self._counter = itertools.count()

    def shutdown(self) -> None:
        """Stop the worker processes of a tensor-parallel engine (idempotent; on one device
        nothing to do). They also stop when this process exits."""
        self.llm_engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Complete raw prompts (no chat template applied)."""
        processed = [self._process_prompt(p) for p in _as_prompt_list(prompts)]
        return self._run(processed, sampling_params, use_tqdm, priority)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             tools: Sequence[Mapping[str, Any]] | None = None,
             chat_template: str | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None,
             add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete conversations in the OpenAI message format (text, image_url, video_url,
        PIL images); a list of conversations runs as one batch."""
        conversations = _as_conversation_list(messages)
        processor = self.llm_engine.processor
        processed = [processor.process_chat(c, tools=tools, chat_template=chat_template,
                                            chat_template_kwargs=chat_template_kwargs,
                                            add_generation_prompt=add_generation_prompt)
                     for c in conversations]
        return self._run(processed, sampling_params, use_tqdm, None)

    def _process_prompt(self, prompt: PromptInput) -> ProcessedPrompt:
        processor = self.llm_engine.processor
        if isinstance(prompt, str):
            return processor.process(prompt)
        if isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                return processor.process_token_ids(prompt["prompt_token_ids"])
            if "prompt" not in prompt:
                raise PromptError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            media = prompt.get("multi_modal_data") or {}
            return processor.process(prompt["prompt"], _listed(media.get("image")),
                                     _listed(media.get("video")))
        return processor.process_token_ids(list(prompt))

    def _run(self, prompts: list[ProcessedPrompt],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool, priority: Sequence[int] | None) -> list[RequestOutput]:
        if sampling_params is None:
            params = [SamplingParams()] * len(prompts)
        elif isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise PromptError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if priority is not None and len(priority) != len(prompts):
            raise PromptError(f"{len(priority)} priorities for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = [f"offline-{next(self._counter)}" for _ in prompts]
        try:
            for i, (request_id, prompt) in enumerate(zip(ids, prompts, strict=True)):
                engine.add_request(request_id, prompt, params[i],
                                   priority=priority[i] if priority else 0, final_only=True)
            return self._drain(ids, use_tqdm)
        finally:
            engine.abort_request(ids)  # whatever did not finish (an exception, Ctrl-C)

    def _drain(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        with bar:
            while len(finished) < len(ids) and engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished and output.request_id in wanted:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in ids if i in finished]


def _listed(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) and not isinstance(t, bool) for t in items):
        return [items]  # one prompt given as token ids
    return items


def _as_conversation_list(messages: Messages | Sequence[Messages]) -> list[Messages]:
    items = list(messages)
    if items and isinstance(items[0], Mapping):
        return [items]  # type: ignore[list-item]
    return items  # type: ignore[return-value]
