"""The synchronous engine: add requests, step, abort. One step = schedule, one forward, update.

    add_request(prompt, params) -> n Requests (n > 1 completions share the prompt's blocks)
    step():  Scheduler.schedule() -> ModelRunner.execute_step() -> Scheduler.update_from_output()
             -> detokenize new tokens, stop strings -> RequestOutput per request that changed
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from glmv.checkpoint import resolve_model_path
from glmv.config import ModelConfig
from glmv.demo import demo_checkpoint, is_demo
from glmv.engine.block_manager import BlockManager
from glmv.engine.config import (
    DEFAULT_CPU_KV_CACHE_GIB,
    CacheConfig,
    EngineArgs,
    GiB,
    SchedulerConfig,
)
from glmv.engine.detokenizer import IncrementalDetokenizer
from glmv.engine.outputs import (
    CompletionOutput,
    PositionLogprobs,
    RequestOutput,
    RunnerOutput,
    SchedulerOutput,
)
from glmv.engine.parallel import WorkerGroup, check_split, rank_device
from glmv.engine.request import MMSpan, Request, RequestStatus, ThinkingBudget
from glmv.engine.scheduler import Scheduler
from glmv.errors import ConfigError, EngineDeadError, GlmvError, PromptError
from glmv.models.glm4v import Glm4vForConditionalGeneration
from glmv.models.loader import load_model
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import MultiModalProcessor, ProcessedPrompt, check_token_ids
from glmv.runner.kv_cache import KVCacheSpec
from glmv.runner.model_runner import ModelRunner
from glmv.sampling_params import SamplingParams
from glmv.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class _Completion:
    """Engine-side state of one completion (one Request)."""

    request: Request
    detokenizer: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] | None
    cumulative_logprob: float = 0.0
    num_seen: int = 0  # output tokens already detokenized
    error: str | None = None
    delta_ids: list[int] = field(default_factory=list)  # tokens added since the last output


@dataclass
class _Group:
    """A caller's request: one prompt, n completions."""

    request_id: str
    prompt: ProcessedPrompt
    final_only: bool = False  # step() reports it once, when it has finished
    completions: list[_Completion] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.request.is_finished for c in self.completions)


class LLMEngine:
    """Owns the processor, the runner (model + KV cache), the block manager and the scheduler.

    Not thread-safe: one caller drives add_request/step/abort (the async engine wraps it).
    """

    def __init__(self, processor: MultiModalProcessor, runner: ModelRunner,
                 scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        self.processor = processor
        processor.max_prompt_tokens = scheduler_config.max_model_len
        self.config: ModelConfig = processor.config
        self.tokenizer: Tokenizer = processor.tokenizer
        self.runner = runner
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.block_manager = BlockManager(runner.cache_spec.num_blocks, cache_config.block_size,
                                          cache_config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, self.block_manager)
        self._groups: dict[str, _Group] = {}
        self._children: dict[str, tuple[_Group, _Completion]] = {}
        self.num_steps = 0
        self.model_path: Path | None = None  # the checkpoint folder, when loaded from one
        self.workers: WorkerGroup | None = None  # the other ranks, under tensor parallelism
        self.death: str | None = None  # why the group of ranks broke, once it has
        self.death_callbacks: list[Callable[[str], None]] = []  # told when it breaks

    @classmethod
    def from_args(cls, args: EngineArgs, media_policy: MediaPolicy | None = None) -> LLMEngine:
        """Load the checkpoint, size the KV cache and build the engine."""
        path = demo_checkpoint(args.model) if is_demo(args.model) else resolve_model_path(
            args.model)
        processor = MultiModalProcessor.from_pretrained(path, media_policy=media_policy)
        config = processor.config
        # Several ranks: the others start here (spawned, or already waiting under torchrun)
        # and load their slices while this process loads its own.
        check_split(config, args)
        workers = WorkerGroup.start(args, Path(path))
        try:
            device = rank_device(args.device, 0) if workers else args.device
            model = load_model(path, config, dtype=args.dtype, device=device,
                               progress=args.show_progress, quantization=args.quantization)
            engine = cls.from_model(processor, model, args)
        except BaseException as exc:
            if workers is None:
                raise
            death = workers.wait_for_death(2.0) if isinstance(exc, RuntimeError) else None
            workers.close()
            if death is not None:  # a rank failed to load: say so rather than gloo's words
                raise EngineDeadError(death) from exc
            raise
        engine.model_path = Path(path)
        if workers is not None:
            engine.workers = workers
            workers.on_death(engine._worker_died)
        return engine

    # -- several ranks -----------------------------------------------------------------------

    def _worker_died(self, reason: str) -> None:
        """From the worker watcher: remember why, so the next step fails with it (a step in
        flight fails on its own, from the broken collective)."""
        self.death = reason
        for callback in self.death_callbacks:
            callback(reason)

    def shutdown(self) -> None:
        """Stop the other ranks (when there are any) and leave the process group. The engine
        cannot step afterwards; on one device this does nothing."""
        self.runner.channel = None  # no more model calls go out; the group tells the ranks
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    @classmethod
    def from_model(cls, processor: MultiModalProcessor, model: Glm4vForConditionalGeneration,
                   args: EngineArgs) -> LLMEngine:
        """An engine around an already loaded model (its dtype and device are used as they
        are); the KV cache and scheduler come from `args`."""
        cache_config = args.cache_config()
        param = next(model.parameters())
        heads = model.num_kv_heads  # this rank's share of them
        one_block = KVCacheSpec.for_memory(processor.config.text, 0, cache_config.block_size,
                                           param.dtype, heads)
        # CPU default: 4 GiB, or less when that is more than max_num_seqs full-length requests
        # could ever use (a small model should not pin gigabytes of zeros).
        limit = args.max_model_len or processor.config.text.max_position_embeddings
        most = -(-limit // cache_config.block_size) * args.max_num_seqs * one_block.bytes_per_block
        spec = KVCacheSpec.for_memory(processor.config.text,
                                      _kv_cache_bytes(cache_config, param.device, most),
                                      cache_config.block_size, param.dtype, heads)
        capacity = spec.num_blocks * spec.block_size
        max_model_len = _max_model_len(args.max_model_len, processor.config, capacity)
        runner = ModelRunner(model, spec, param.device, cache_config.encoder_cache_bytes)
        return cls(processor, runner, args.scheduler_config(max_model_len), cache_config)

    # -- requests ----------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: ProcessedPrompt, params: SamplingParams,
                    priority: int = 0, arrival_time: float | None = None,
                    final_only: bool = False) -> None:
        """Queue a preprocessed prompt; raises PromptError/GlmvError when it cannot run.

        `final_only`: step() leaves the request out of its outputs until it has finished
        (callers that only want the whole completion: no per-step output objects, and no
        per-step hand-over to a consumer thread)."""
        if request_id in self._groups:
            raise GlmvError(f"request id {request_id!r} is already in use")
        self._check_prompt(prompt)
        num_prompt = len(prompt.token_ids)
        max_len = self.scheduler_config.max_model_len
        if params.max_tokens is None:
            params = replace(params, max_tokens=max_len - num_prompt)
        spans = tuple(MMSpan(item.offset, item.length, item.content_hash, i)
                      for i, item in enumerate(prompt.mm_items))
        group = _Group(request_id, prompt, final_only)
        leader: Request | None = None
        for index in range(params.n):
            child_params = params.for_child(index) if params.n > 1 else params
            child_id = request_id if params.n == 1 else f"{request_id}-{index}"
            request = Request(
                child_id, prompt.token_ids, child_params, self.config.eos_token_ids, spans,
                priority=priority, arrival_time=arrival_time, payload=prompt, wait_for=leader,
                thinking_budget=self._thinking_budget(child_params, prompt.token_ids))
            leader = leader or request
            completion = _Completion(request, IncrementalDetokenizer(
                self.tokenizer, child_params.skip_special_tokens, child_params.stop,
                child_params.include_stop_str_in_output, child_params.keep_special_token_ids),
                [] if child_params.logprobs is not None else None)
            group.completions.append(completion)
            self._children[child_id] = (group, completion)
        self._groups[request_id] = group
        for completion in group.completions:
            self.scheduler.add_request(completion.request)

    def _check_prompt(self, prompt: ProcessedPrompt) -> None:
        num_prompt = len(prompt.token_ids)
        max_len = self.scheduler_config.max_model_len
        if num_prompt == 0:
            raise PromptError("the prompt is empty")
        if num_prompt >= max_len:
            raise PromptError(
                f"the prompt is {num_prompt} tokens ({prompt.num_image_tokens} image, "
                f"{prompt.num_video_tokens} video) but max_model_len is {max_len}: it must "
                "leave room for at least one generated token")
        check_token_ids(prompt.token_ids, self.config.text.vocab_size)

    def _thinking_budget(self, params: SamplingParams,
                         prompt_ids: list[int]) -> ThinkingBudget | None:
        if params.thinking_budget is None:
            return None
        special = self.tokenizer.special
        return ThinkingBudget(params.thinking_budget, special.think, special.end_think,
                              special.newline, prompt_ids)

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Cancel requests (by the id given to add_request) at any point; unknown ids are
        ignored. Their blocks are freed at once."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            group = self._groups.get(request_id)
            if group is None:
                continue
            self.scheduler.abort_requests([c.request.request_id for c in group.completions])
            self._retire(group)

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # -- stepping ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One scheduling step and one forward; outputs of the requests that changed.

        Raises EngineDeadError once a rank of a tensor-parallel group is gone."""
        if self.death is not None:
            raise EngineDeadError(self.death)
        work = self.scheduler.schedule()
        if work.is_empty:
            self.runner.release(work.finished_ids)
            return []
        result = self._execute(work)
        self.num_steps += 1
        touched: dict[str, _Group] = {}
        for request in self.scheduler.update_from_output(work, result):
            group, completion = self._children[request.request_id]
            if request.request_id in result.failed:
                completion.error = result.failed[request.request_id]
            self._absorb(completion, result)
            touched[group.request_id] = group
        outputs = [self._output(group) for group in touched.values()
                   if group.finished or not group.final_only]
        for group in touched.values():
            if group.finished:
                self._retire(group)
        return outputs

    def _execute(self, work: SchedulerOutput) -> RunnerOutput:
        try:
            return self.runner.execute_step(work)
        except Exception as exc:  # one failed forward fails its requests, not the engine
            if self.runner.is_distributed:
                # ... except over several ranks: the others may be inside a collective this
                # rank left, so no later call would line up with theirs.
                # A spawned worker's exit names the culprit (it is usually why a collective
                # broke); ranks glmv did not spawn leave only the collective's own error.
                known = self.workers.wait_for_death(2.0) if self.workers is not None else None
                self.death = self.death or known or (
                    f"a step over the tensor-parallel ranks failed ({type(exc).__name__}: "
                    f"{exc})")
                logger.critical("%s; the engine stops", self.death)
                raise EngineDeadError(self.death) from exc
            logger.exception("engine step failed; failing its %d requests", len(work.chunks))
            message = f"the engine step running this request failed: {type(exc).__name__}: {exc}"
            return RunnerOutput(sampled={}, failed={c.request.request_id: message
                                                    for c in work.chunks})

    def _absorb(self, completion: _Completion, result: RunnerOutput) -> None:
        """Detokenize the request's new tokens; finish it on a stop string."""
        request = completion.request
        new = request.output_token_ids[completion.num_seen:]
        completion.num_seen += len(new)
        if not new:
            return
        position = result.logprobs.get(request.request_id)
        if position is not None and completion.logprobs is not None:
            completion.logprobs.append(position)
            completion.cumulative_logprob += position[new[-1]].logprob
        # A stop token ends the text without being part of it (vLLM's rule), unless asked.
        text_ids = new
        if request.stopped_on_token and not request.sampling_params.include_stop_str_in_output:
            text_ids = new[:-1]
        stop = completion.detokenizer.update(text_ids)
        if stop is not None and not request.is_finished:
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED, stop)
        completion.delta_ids.extend(new)

    def _output(self, group: _Group) -> RequestOutput:
        prompt = group.prompt
        outputs = []
        for index, completion in enumerate(group.completions):
            request = completion.request
            new_ids, completion.delta_ids = completion.delta_ids, []
            outputs.append(CompletionOutput(
                index=index,
                text=completion.detokenizer.output_text,
                token_ids=list(request.output_token_ids),
                finish_reason=request.status.finish_reason,
                stop_reason=request.stop_reason,
                logprobs=list(completion.logprobs) if completion.logprobs is not None else None,
                cumulative_logprob=(completion.cumulative_logprob
                                    if completion.logprobs is not None else None),
                error=completion.error,
                delta_text=completion.detokenizer.get_delta(finished=request.is_finished),
                delta_token_ids=new_ids,
            ))
        leader = group.completions[0].request
        firsts = [c.request.first_token_time for c in group.completions
                  if c.request.first_token_time is not None]
        return RequestOutput(
            request_id=group.request_id, prompt=prompt.prompt,
            prompt_token_ids=prompt.token_ids, outputs=outputs, finished=group.finished,
            num_image_tokens=prompt.num_image_tokens, num_video_tokens=prompt.num_video_tokens,
            num_cached_tokens=max(leader.num_cached_tokens, 0),
            first_token_time=min(firsts, default=None))

    def _retire(self, group: _Group) -> None:
        self._groups.pop(group.request_id, None)
        ids = [c.request.request_id for c in group.completions]
        for child_id in ids:
            self._children.pop(child_id, None)
        self.runner.release(ids)


def _kv_cache_bytes(cache: CacheConfig, device: torch.device, most: int) -> int:
    if cache.kv_cache_memory_gib is not None:
        return int(cache.kv_cache_memory_gib * GiB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * cache.gpu_memory_utilization)
    return min(int(DEFAULT_CPU_KV_CACHE_GIB * GiB), most)


def _max_model_len(requested: int | None, config: ModelConfig, capacity: int) -> int:
    """The requested length, or the model's limit capped by what the KV cache holds."""
    limit = config.text.max_position_embeddings
    if requested is None:
        return min(limit, capacity)
    if requested > limit:
        raise ConfigError(f"max_model_len {requested} exceeds the model's "
                          f"max_position_embeddings ({limit})")
    if requested > capacity:
        raise ConfigError(
            f"max_model_len {requested} does not fit in the KV cache ({capacity} tokens): raise "
            "--kv-cache-memory or lower --max-model-len")
    return requested
