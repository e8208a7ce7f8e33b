"""A plain generation loop over the runner: all prompts prefilled in one forward, then decoded
together one token per sequence per step, each with a fixed set of KV blocks.

This is the engine-less path behind `glmv generate`; it has no scheduler, preemption or prefix
caching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from glmv.errors import PromptError
from glmv.multimodal.processor import ProcessedPrompt
from glmv.multimodal.rope_index import decode_positions
from glmv.runner.input_batch import SeqChunk
from glmv.runner.model_runner import ModelRunner
from glmv.runner.sampler import SimpleSampling, sample_one


@dataclass
class GenerationRequest:
    """One prompt to complete."""

    prompt: ProcessedPrompt
    max_tokens: int = 64
    sampling: SimpleSampling = field(default_factory=SimpleSampling)
    stop_token_ids: tuple[int, ...] = ()  # finish when one is produced (it is kept)
    ignore_eos: bool = False


@dataclass
class GenerationResult:
    """The completion of one request."""

    token_ids: list[int]  # generated tokens (a stop token, when one ended it, included)
    finish_reason: Literal["stop", "length"]


@dataclass
class _Seq:
    req: GenerationRequest
    blocks: list[int]
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    finish_reason: Literal["stop", "length"] | None = None


def _vision_chunks(runner: ModelRunner, prompts: Sequence[ProcessedPrompt]) -> list[SeqChunk]:
    items = [item for p in prompts for item in p.mm_items]
    embeds = None
    if items:
        pixels = torch.cat([i.pixel_values for i in items])
        embeds = runner.encode_vision(pixels, [i.grid_thw for i in items])
    image_token_id = runner.model.config.image_token_id
    chunks, used = [], 0
    for p in prompts:
        chunk = SeqChunk(p.token_ids, p.positions, 0, [])
        count = sum(i.num_embeds for i in p.mm_items)
        if count:
            assert embeds is not None
            chunk.vision_embeds = embeds[used : used + count]
            chunk.vision_mask = torch.tensor(p.token_ids) == image_token_id
            used += count
        chunks.append(chunk)
    return chunks


def generate(runner: ModelRunner, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    """Complete every request; results in request order."""
    block_size = runner.cache_spec.block_size
    free = list(range(runner.cache_spec.num_blocks))
    seqs = []
    for req in requests:
        need = -(-(len(req.prompt.token_ids) + req.max_tokens) // block_size)
        if need > len(free):
            raise PromptError(f"prompt of {len(req.prompt.token_ids)} tokens + {req.max_tokens} "
                              "new tokens does not fit in the KV cache; raise --kv-cache-memory")
        blocks, free = free[:need], free[need:]
        gen = (torch.Generator(device=runner.device).manual_seed(req.sampling.seed)
               if req.sampling.seed is not None else None)
        seqs.append(_Seq(req, blocks, gen))
    chunks = _vision_chunks(runner, [s.req.prompt for s in seqs])
    for seq, chunk in zip(seqs, chunks, strict=True):
        chunk.block_table = seq.blocks
    logits = runner.execute(chunks)
    _append(seqs, logits)
    while True:
        active = [s for s in seqs if s.finish_reason is None]
        if not active:
            break
        decode = []
        for s in active:
            index = len(s.req.prompt.token_ids) + len(s.output) - 1
            decode.append(SeqChunk([s.output[-1]],
                                   decode_positions(index, 1, s.req.prompt.rope_delta),
                                   index, s.blocks))
        _append(active, runner.execute(decode))
    return [GenerationResult(s.output, s.finish_reason or "length") for s in seqs]


def _append(seqs: Sequence[_Seq], logits: torch.Tensor) -> None:
    greedy = logits.argmax(dim=-1).tolist()  # one device sync for every greedy sequence
    for seq, row, best in zip(seqs, logits, greedy, strict=True):
        sampled = seq.req.sampling.temperature > 0
        token = sample_one(row, seq.req.sampling, seq.generator) if sampled else best
        seq.output.append(token)
        if token in seq.req.stop_token_ids and not seq.req.ignore_eos:
            seq.finish_reason = "stop"
        elif len(seq.output) >= seq.req.max_tokens:
            seq.finish_reason = "length"
