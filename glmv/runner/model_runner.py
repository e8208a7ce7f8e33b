"""Runs the model: one forward per engine step over every scheduled chunk, then sampling.

    SchedulerOutput (chunks of many requests: prefill pieces and decode tokens)
      -> SeqChunks (token ids, positions [3, n], block table, vision rows)   this module
      -> StepInputs (flat tensors)                                           input_batch.py
      -> vision encoder (items first reached this step, cached by hash)     encoder_cache.py
      -> decoder forward -> logits of the chunks that end a request's tokens -> Sampler
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glmv.distributed.parallel_state import get_tp_group
from glmv.engine.outputs import RunnerOutput, ScheduledChunk, SchedulerOutput
from glmv.models.glm4v import Glm4vForConditionalGeneration
from glmv.multimodal.processor import ProcessedPrompt
from glmv.multimodal.rope_index import decode_positions
from glmv.runner.encoder_cache import EncoderCache, VisionInputs
from glmv.runner.executor import ModelExecutor, StepChannel, portable
from glmv.runner.input_batch import SeqChunk
from glmv.runner.kv_cache import KVCacheSpec
from glmv.runner.sampler import Sampler, SamplingRow, make_generator, needs_only_argmax


class ModelRunner:
    """Owns the model executor (the model and its paged KV cache), the encoder cache and each
    running request's sampling generator. Under tensor parallelism this is rank 0: every model
    call is broadcast to the other ranks first (see executor.py)."""

    def __init__(self, model: Glm4vForConditionalGeneration, cache: KVCacheSpec,
                 device: torch.device | str = "cpu", encoder_cache_bytes: int = 0) -> None:
        self.channel = StepChannel.for_group(get_tp_group())
        if self.channel is not None:
            self.channel.send("cache", cache)
        self.executor = ModelExecutor(model, cache, device)
        self.model = model
        self.cache_spec = cache
        self.device = self.executor.device
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self.vision = VisionInputs(self.encoder_cache, self.encode_vision,
                                   model.config.image_token_id)
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator | None] = {}

    @property
    def is_distributed(self) -> bool:
        """Whether other ranks run this runner's model calls too."""
        return self.channel is not None

    def encode_vision(self, pixels: torch.Tensor,
                      grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """[P, patch_dim] -> [P / merge^2, hidden] in the model's dtype."""
        if self.channel is not None:
            self.channel.send("encode", pixels.cpu(), grids)
        return self.executor.encode(pixels, grids)

    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run all chunks in one forward; logits [num_chunks, vocab] (float32) of each chunk's
        last token."""
        return self._forward(chunks, list(range(len(chunks)))).float()

    def _forward(self, chunks: list[SeqChunk], logit_chunks: list[int]) -> torch.Tensor:
        if self.channel is not None:
            self.channel.send("forward", portable(chunks), logit_chunks)
        return self.executor.forward(chunks, logit_chunks)

    # -- engine steps ------------------------------------------------------------------------

    def release(self, request_ids: Sequence[str]) -> None:
        """Forget finished requests' generators and held vision rows."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)
            self.vision.release(request_id)

    @torch.inference_mode()
    def execute_step(self, work: SchedulerOutput) -> RunnerOutput:
        """Run one scheduler step; one sampled token per chunk that reaches its request's end."""
        self.release(work.finished_ids)
        for request in work.preempted:  # will re-prefill; its generator state is kept
            self.vision.release(request.request_id)
        self._prepare_vision(work.chunks)
        chunks = [self._seq_chunk(c) for c in work.chunks]
        sampling = [i for i, c in enumerate(work.chunks) if c.samples]
        if not sampling:
            self._forward(chunks, [])
            return RunnerOutput(sampled={})
        rows = [self._sampling_row(work.chunks[i]) for i in sampling]
        ids = [work.chunks[i].request.request_id for i in sampling]
        if (self.channel is None and self.executor.greedy_without_logits
                and needs_only_argmax(rows)):
            chosen = self.executor.forward(chunks, sampling, greedy=True).tolist()
            tokens = [t if row.forced_token is None else row.forced_token
                      for row, t in zip(rows, chosen, strict=True)]
            return RunnerOutput(sampled=dict(zip(ids, tokens, strict=True)))
        logits = self._forward(chunks, sampling)  # [len(sampling), vocab] in the model's dtype
        out = self.sampler(logits, rows)
        logprobs = {rid: lp for rid, lp in zip(ids, out.logprobs, strict=True) if lp is not None}
        return RunnerOutput(sampled=dict(zip(ids, out.token_ids, strict=True)), logprobs=logprobs)

    def _prepare_vision(self, chunks: Sequence[ScheduledChunk]) -> None:
        needs = []
        for chunk in chunks:
            prompt: ProcessedPrompt = chunk.request.payload
            for idx, item in enumerate(prompt.mm_items):
                if item.offset < chunk.end and item.offset + item.length > chunk.start:
                    needs.append((chunk.request.request_id, idx, item))
        if needs:
            self.vision.prepare(needs)

    def _seq_chunk(self, chunk: ScheduledChunk) -> SeqChunk:
        request = chunk.request
        prompt: ProcessedPrompt = request.payload
        num_prompt = request.num_prompt_tokens
        start, end = chunk.start, chunk.end
        # Prompt tokens take the processor's 3-D positions; generated ones continue them as
        # index + rope_delta on all three axes.
        parts = []
        if start < num_prompt:
            parts.append(prompt.positions[:, start:min(end, num_prompt)])
        if end > num_prompt:
            first = max(start, num_prompt)
            parts.append(decode_positions(first, end - first, prompt.rope_delta))
        positions = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        seq = SeqChunk(request.all_token_ids[start:end], positions, start, chunk.block_ids)
        if prompt.mm_items and start < num_prompt:
            rows = self.vision.rows_for(request.request_id, prompt.token_ids, prompt.mm_items,
                                        start, min(end, num_prompt))
            if rows is not None:
                embeds, mask = rows
                if end > num_prompt:
                    mask = torch.cat([mask, torch.zeros(end - num_prompt, dtype=torch.bool)])
                seq.vision_embeds, seq.vision_mask = embeds, mask
        return seq

    def _sampling_row(self, chunk: ScheduledChunk) -> SamplingRow:
        request = chunk.request
        params = request.sampling_params
        if request.request_id not in self._generators:
            self._generators[request.request_id] = make_generator(params.seed, self.device)
        stop_ids = params.stop_token_ids
        if not params.ignore_eos:
            stop_ids = (*request.eos_token_ids, *stop_ids)
        return SamplingRow(
            params=params,
            generator=self._generators[request.request_id],
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            stop_token_ids=stop_ids,
            forced_token=request.forced_token(),
        )

