"""Attention over a paged KV cache with torch's scaled_dot_product_attention (CPU and CUDA).

New keys/values are written to their slots first; each sequence then attends to its whole
context gathered from its blocks, with a causal mask offset by the tokens already cached.
On a bf16 CPU tensor the decode rows go to the paged kernel (`paged_decode_attention`) and
each prefill chunk to the causal segment kernel (`varlen_attention`); otherwise SDPA.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from glmv.attention.metadata import AttentionMetadata, DecodeBatch
from glmv.kernels import cpu_ops


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]; k, v: [N, kv_heads, D]."""
    ops = cpu_ops(kv_cache)
    if (ops is not None and k.dtype is kv_cache.dtype and v.dtype is kv_cache.dtype
            and k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2]
            and k.stride(2) == 1 and v.stride(2) == 1):
        ops.write_kv(kv_cache, k, v, slot_mapping)
        return
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache[0].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def _gather_context(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                    block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    # index_select: much cheaper on CPU than advanced indexing
    k = kv_cache[0].index_select(0, blocks).flatten(0, 1)[:seq_len]  # [seq_len, kv_heads, D]
    v = kv_cache[1].index_select(0, blocks).flatten(0, 1)[:seq_len]
    return k, v


def _decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, batch: DecodeBatch,
                      scale: float) -> torch.Tensor:
    """Every decode sequence at once: [S, heads, D] out of the gathered blocks.

    Two batched matmuls with the query heads grouped under their KV head: for one query token
    this is several times faster on CPU than SDPA (which pays for its kernel setup per
    sequence-head and for the expanded mask). Masked key slots hold stale but finite values
    (the cache is zero-initialised); softmax runs in float32.
    """
    q = q[batch.token_idx]  # [S, heads, D]
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    num_keys = batch.padding.shape[-1]
    # index_select + one contiguous copy: several times cheaper than advanced indexing and
    # than a matmul over a strided key view.
    k = kv_cache[0].index_select(0, batch.flat_blocks).view(num_seqs, num_keys, num_kv_heads,
                                                            head_dim)
    v = kv_cache[1].index_select(0, batch.flat_blocks).view(num_seqs, num_keys, num_kv_heads,
                                                            head_dim)
    k = k.transpose(1, 2).contiguous()  # [S, kv, T, D]
    v = v.transpose(1, 2).contiguous()
    qg = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [S, kv, G, T]
    scores.masked_fill_(batch.padding, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(num_seqs, num_heads, head_dim)


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_cache: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [N, heads, D]; k, v: [N, kv_heads, D] (new tokens). Returns [N, heads, D]."""
    if kv_cache is not None and meta.uses_cache:
        assert meta.slot_mapping is not None and meta.block_tables is not None
        write_kv(kv_cache, k, v, meta.slot_mapping)
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    batch = meta.decode_batch() if kv_cache is not None else None
    if batch is not None and kv_cache is not None:
        _attend_cached(out, q, kv_cache, meta, batch, scale)
    batched = set(batch.seqs) if batch is not None else set()
    prefill_ops = _prefill_kernel(q, k)
    for i in range(meta.num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        if start == end or i in batched:
            continue
        seq_len = meta.seq_lens[i]
        # A step that holds the whole sequence attends to its own new keys: no gather, and
        # SDPA's causal kernel instead of an explicit mask.
        whole = end - start == seq_len
        if whole or kv_cache is None or not meta.uses_cache:
            ki, vi = k[start:end], v[start:end]
        else:
            assert meta.block_tables is not None
            ki, vi = _gather_context(kv_cache, meta.block_tables[i], seq_len, meta.block_size)
        if prefill_ops is not None:  # the chunk's queries are the last of its seq_len keys
            prefill_ops.varlen_attention(out[start:end], q[start:end], ki, vi,
                                         torch.tensor([0, end - start]),
                                         torch.tensor([0, seq_len]), scale, True)
            continue
        qi = q[start:end].transpose(0, 1)[None]  # [1, heads, q_len, D]
        ki, vi = ki.transpose(0, 1)[None], vi.transpose(0, 1)[None]  # [1, kv_heads, s, D]
        mask = None if whole else meta.causal_mask(i, q.device)
        oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale,
                                            is_causal=whole and seq_len > 1, enable_gqa=gqa)
        out[start:end] = oi[0].transpose(0, 1)
    return out


def last_token_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         meta: AttentionMetadata, rows: DecodeBatch, scale: float,
                         kv_cache: torch.Tensor) -> torch.Tensor:
    """The step's new keys/values written, then attention for some sequences' last new token
    only: q [R, heads, D] those queries (rows.token_idx 0..R-1, `meta.last_tokens`); k, v
    [N, kv_heads, D] every new token. Returns [R, heads, D]. Each query sees its sequence's
    whole context, as its row of `sdpa_attention` does, through the decode kernel."""
    assert meta.slot_mapping is not None
    write_kv(kv_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    _attend_cached(out, q, kv_cache, meta, rows, scale)
    return out


def _attend_cached(out: torch.Tensor, q: torch.Tensor, kv_cache: torch.Tensor,
                   meta: AttentionMetadata, batch: DecodeBatch, scale: float) -> None:
    """out[batch.token_idx] = one query each (q[batch.token_idx]) over its sequence's cached
    context: the paged decode kernel on a bf16 CPU, else two batched matmuls."""
    ops = cpu_ops(q)
    if ops is not None and kv_cache.dtype is q.dtype:
        assert meta.block_tables is not None
        ops.paged_decode_attention(out, q, kv_cache, meta.block_tables, batch.seq_idx,
                                   batch.token_idx, batch.seq_lens, scale)
    else:
        out[batch.token_idx] = _decode_attention(q, kv_cache, batch, scale)


def _prefill_kernel(q: torch.Tensor, k: torch.Tensor) -> Any | None:
    """The CPU kernels' causal segment attention when it applies (bf16 on a CPU with
    AVX-512, head_dim a multiple of 16): ~3x SDPA's CPU flash kernel on a prefill chunk."""
    ops = cpu_ops(q)
    if (ops is None or not ops.bf16_attention() or q.shape[2] % 16 or k.dtype is not q.dtype
            or q.stride(2) != 1 or k.stride(2) != 1):
        return None
    return ops
