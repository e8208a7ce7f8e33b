"""The decoder's attention op: heads in, heads out, keys/values kept in the bound KV cache."""

from __future__ import annotations

import torch
from torch import nn

from glmv.attention.backends import AttentionFn, get_backend
from glmv.attention.metadata import AttentionMetadata


class Attention(nn.Module):
    """Causal attention of one layer. The runner binds `kv_cache` after allocating it.

    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] or None (no cache: each
    sequence's new tokens are its whole context).
    """

    def __init__(self, scale: float, backend: str = "torch_sdpa") -> None:
        super().__init__()
        self.scale = scale
        self.kv_cache: torch.Tensor | None = None
        self.backend = backend
        self._backend: AttentionFn = get_backend(backend)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q: [N, heads, D]; k, v: [N, kv_heads, D] -> [N, heads * D]."""
        out = self._backend(q, k, v, meta, self.scale, self.kv_cache)
        return out.flatten(1)
