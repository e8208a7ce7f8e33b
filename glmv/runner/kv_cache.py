"""Paged KV cache tensors, one per decoder layer, bound to the model's attention layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmv.config import TextConfig
from glmv.kernels.memory import huge_page_empty


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the cache: num_blocks blocks of block_size tokens for every layer."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @classmethod
    def for_memory(cls, cfg: TextConfig, memory_bytes: int, block_size: int,
                   dtype: torch.dtype, num_kv_heads: int | None = None) -> KVCacheSpec:
        """As many blocks as fit in `memory_bytes`. `num_kv_heads`: the KV heads this rank
        holds (its share under tensor parallelism; default all of the model's)."""
        heads = cfg.num_key_value_heads if num_kv_heads is None else num_kv_heads
        one = cls(cfg.num_hidden_layers, 1, block_size, heads, cfg.head_dim, dtype)
        return cls(cfg.num_hidden_layers, max(1, memory_bytes // one.bytes_per_block), block_size,
                   heads, cfg.head_dim, dtype)


def allocate_kv_cache(spec: KVCacheSpec, device: torch.device | str) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer."""
    shape = (2, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    # Zeroed: batched decode attention reads whole blocks under a mask, and a never-written
    # slot holding NaN would poison it (0 x NaN = NaN in the weighted sum). On the CPU in
    # 2 MiB pages: a step reads every live block of every layer, scattered over the cache.
    if torch.device(device).type == "cpu":
        return [huge_page_empty(shape, spec.dtype).zero_() for _ in range(spec.num_layers)]
    return [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(spec.num_layers)]
