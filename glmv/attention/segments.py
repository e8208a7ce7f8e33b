"""Bidirectional attention within segments: the vision tower's images and video frames.

Tokens [N, heads, head_dim] are split into consecutive segments; each token attends to every
token of its own segment and to no other. On a bf16 CPU tensor this is one call of the fused
kernel `torch.ops.glmv.varlen_attention` (AVX-512 bf16 products, fp32 softmax: about twice the
speed of SDPA per image); elsewhere one scaled_dot_product_attention per segment.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from glmv.kernels import cpu_ops

#: head_dim the kernel takes (whole 16-lane registers of bf16 pairs)
_KERNEL_HEAD_DIM_MULTIPLE = 16


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      seg_lens: Sequence[int]) -> torch.Tensor:
    """q, k, v [N, heads, head_dim] (views with unit stride along head_dim are fine);
    seg_lens sum to N -> out [N, heads, head_dim], contiguous."""
    n, heads, head_dim = q.shape
    out = torch.empty(n, heads, head_dim, dtype=q.dtype, device=q.device)
    ops = cpu_ops(q)
    if (ops is not None and head_dim % _KERNEL_HEAD_DIM_MULTIPLE == 0
            and all(t.stride(2) == 1 and t.dtype is q.dtype for t in (q, k, v))):
        cu_seqlens = torch.tensor([0, *itertools.accumulate(seg_lens)], dtype=torch.long)
        ops.varlen_attention(out, q, k, v, cu_seqlens, cu_seqlens, head_dim**-0.5, False)
        return out
    start = 0
    for length in seg_lens:
        sl = slice(start, start + length)
        qi, ki, vi = (t[sl].transpose(0, 1)[None] for t in (q, k, v))  # [1, heads, L, D]
        out[sl] = F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1)
        start += length
    return out
