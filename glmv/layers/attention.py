"""The decoder's attention op: heads in, heads out, keys/values kept in the bound KV cache."""

from __future__ import annotations

import torch
from torch import nn

from glmv.attention.backends import AttentionFn, get_backend
from glmv.attention.metadata import AttentionMetadata, DecodeBatch
from glmv.attention.torch_sdpa import last_token_attention, write_kv


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
                meta: AttentionMetadata, rows: DecodeBatch | None = None) -> torch.Tensor:
        """q: [N, heads, D]; k, v: [N, kv_heads, D] -> [N, heads * D].

        With `rows` (`meta.last_tokens`), q holds only those sequences' last new tokens,
        [R, heads, D], and so does the result, [R, heads * D]: every new key and value is
        still written to the cache."""
        if rows is None:
            out = self._backend(q, k, v, meta, self.scale, self.kv_cache)
        elif self.kv_cache is None or self.backend != "torch_sdpa":
            raise ValueError("attention for last tokens only needs a KV cache and the "
                             "torch_sdpa backend")
        else:
            out = last_token_attention(q, k, v, meta, rows, self.scale, self.kv_cache)
        return out.flatten(1)

    def write_cache(self, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> None:
        """Only the step's new keys and values into the cache (no query needs attention)."""
        if self.kv_cache is None or meta.slot_mapping is None:
            raise ValueError("write_cache needs a KV cache and the step's slots")
        write_kv(self.kv_cache, k, v, meta.slot_mapping)
