"""Runs the model: the vision encoder on request, and one decoder forward per step."""

from __future__ import annotations

import torch

from glmv.models.glm4v import Glm4vForConditionalGeneration
from glmv.runner.input_batch import SeqChunk, build_step_inputs
from glmv.runner.kv_cache import KVCacheSpec, allocate_kv_cache


class ModelRunner:
    """Owns the model and its paged KV cache (bound into every attention layer)."""

    def __init__(self, model: Glm4vForConditionalGeneration, cache: KVCacheSpec,
                 device: torch.device | str = "cpu") -> None:
        self.model = model
        self.cache_spec = cache
        self.device = torch.device(device)
        self.kv_caches = allocate_kv_cache(cache, self.device)
        layers = model.kv_cache_layers()
        if len(layers) != len(self.kv_caches):
            raise ValueError(f"{len(layers)} attention layers but {len(self.kv_caches)} caches")
        for layer, kv in zip(layers, self.kv_caches, strict=True):
            layer.kv_cache = kv

    @torch.inference_mode()
    def encode_vision(self, pixels: torch.Tensor,
                      grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """[P, patch_dim] -> [P / merge^2, hidden] in the model's dtype."""
        return self.model.encode_vision(pixels.to(self.device), grids)

    @torch.inference_mode()
    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Run all chunks in one forward; logits [num_chunks, vocab] of each chunk's last token."""
        step = build_step_inputs(chunks, self.cache_spec.block_size, self.device)
        embeds = self.model.embed_with_vision(step.input_ids, step.vision_embeds,
                                              step.vision_mask)
        hidden = self.model(embeds, step.positions, step.meta)
        return self.model.compute_logits(hidden[step.last_token_idx]).float()
