"""Helpers shared by test modules (no transformers needed)."""

from __future__ import annotations

from typing import Any

import torch

from glmv.attention.metadata import AttentionMetadata
from glmv.multimodal.processor import ProcessedPrompt


def glmv_logits(model: Any, prompt: ProcessedPrompt) -> torch.Tensor:
    """Logits of every prompt position, one forward without KV cache."""
    ids = torch.tensor(prompt.token_ids)
    vision = mask = None
    if prompt.mm_items:
        pixels = torch.cat([i.pixel_values for i in prompt.mm_items])
        vision = model.encode_vision(pixels, [i.grid_thw for i in prompt.mm_items])
        mask = ids == model.config.image_token_id
    with torch.inference_mode():
        embeds = model.embed_with_vision(ids, vision, mask)
        hidden = model(embeds, prompt.positions, AttentionMetadata.without_cache([len(ids)]))
        return model.compute_logits(hidden).float()
