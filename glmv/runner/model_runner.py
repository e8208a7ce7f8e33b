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

from glmv.engine.outputs import RunnerOutput, ScheduledChunk, SchedulerOutput
from glmv.kernels import get_ops
from glmv.layers.linear import pack_linear_weights
from glmv.models.glm4v import Glm4vForConditionalGeneration
from glmv.multimodal.processor import ProcessedPrompt
from glmv.multimodal.rope_index import decode_positions
from glmv.runner.encoder_cache import EncoderCache, VisionInputs
from glmv.runner.input_batch import SeqChunk, build_step_inputs
from glmv.runner.kv_cache import KVCacheSpec, allocate_kv_cache
from glmv.runner.sampler import Sampler, SamplingRow, make_generator


class ModelRunner:
    """Owns the model, its paged KV cache (bound into every attention layer), the encoder
    cache and each running request's sampling generator."""

    def __init__(self, model: Glm4vForConditionalGeneration, cache: KVCacheSpec,
                 device: torch.device | str = "cpu", encoder_cache_bytes: int = 0) -> None:
        self.model = model
        # CPU bf16: oneDNN-packed weights (much faster decode-sized products).
        self.num_packed_layers = pack_linear_weights(model)
        if torch.device(device).type == "cpu" and _dtype(model) is torch.bfloat16:
            get_ops()  # compile the fused kernels now (once per machine), not in a request
        self.cache_spec = cache
        self.device = torch.device(device)
        self.kv_caches = allocate_kv_cache(cache, self.device)
        self._layers = model.kv_cache_layers()
        if len(self._layers) != len(self.kv_caches):
            raise ValueError(f"{len(self._layers)} attention layers but {len(self.kv_caches)} "
                             "caches")
        self._bind()
        self.encoder_cache = EncoderCache(encoder_cache_bytes)
        self.vision = VisionInputs(self.encoder_cache, self.encode_vision,
                                   model.config.image_token_id)
        self.sampler = Sampler()
        self._generators: dict[str, torch.Generator | None] = {}

    def _bind(self) -> None:
        """Point every attention layer at this runner's cache (another runner built on the
        same model, e.g. in tests, may have rebound them)."""
        for layer, kv in zip(self._layers, self.kv_caches, strict=True):
            if layer.kv_cache is not kv:
                layer.kv_cache = kv

    @torch.inference_mode()
    def encode_vision(self, pixels: torch.Tensor,
                      grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """[P, patch_dim] -> [P / merge^2, hidden] in the model's dtype."""
        return self.model.encode_vision(pixels.to(self.device), grids)

    @torch.inference_mode()
    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run all chunks in one forward; logits [num_chunks, vocab] (float32) of each chunk's
        last token."""
        return self._forward(chunks, list(range(len(chunks)))).float()

    def _forward(self, chunks: list[SeqChunk], logit_chunks: list[int]) -> torch.Tensor:
        self._bind()
        step = build_step_inputs(chunks, self.cache_spec.block_size, self.device)
        embeds = self.model.embed_with_vision(step.input_ids, step.vision_embeds,
                                              step.vision_mask)
        hidden = self.model(embeds, step.positions, step.meta)
        return self.model.compute_logits(hidden[step.last_token_idx[logit_chunks]])

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
        logits = self._forward(chunks, sampling)  # [len(sampling), vocab] in the model's dtype
        rows = [self._sampling_row(work.chunks[i]) for i in sampling]
        out = self.sampler(logits, rows)
        ids = [work.chunks[i].request.request_id for i in sampling]
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


def _dtype(model: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
