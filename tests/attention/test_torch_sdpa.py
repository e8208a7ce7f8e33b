"""Paged attention over flattened tokens equals plain causal attention per sequence."""

from __future__ import annotations

import math

import pytest
import torch

from glmv.attention.metadata import AttentionMetadata
from glmv.attention.torch_sdpa import sdpa_attention

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 8, 4


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal GQA attention of one whole sequence: q [L, H, D], k/v [L, KV, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def qkv(length: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(length, h, DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS))


def test_without_cache_matches_naive_for_several_sequences() -> None:
    gen = torch.Generator().manual_seed(0)
    seqs = [qkv(n, gen) for n in (5, 1, 9)]
    q, k, v = (torch.cat([s[i] for s in seqs]) for i in range(3))
    out = sdpa_attention(q, k, v, AttentionMetadata.without_cache([5, 1, 9]), DIM**-0.5)
    expected = torch.cat([naive(*s) for s in seqs])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [[11], [3, 8], [4, 4, 3], [1] * 11])
def test_chunked_prefill_over_shuffled_blocks_matches_naive(chunks: list[int]) -> None:
    """Any split of one sequence into steps, with blocks scattered in the cache, gives the same
    outputs as attending to the whole sequence at once."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = qkv(sum(chunks), gen)
    expected = naive(q, k, v)
    cache = torch.zeros(2, 16, BLOCK, KV_HEADS, DIM)
    table = torch.tensor([13, 2, 7], dtype=torch.int32)  # non-contiguous, out of order
    start = 0
    for n in chunks:
        end = start + n
        slots = torch.tensor([int(table[i // BLOCK]) * BLOCK + i % BLOCK
                              for i in range(start, end)])
        meta = AttentionMetadata([0, n], [end], slots, table[None], BLOCK)
        out = sdpa_attention(q[start:end], k[start:end], v[start:end], meta, DIM**-0.5, cache)
        torch.testing.assert_close(out, expected[start:end], rtol=1e-5, atol=1e-5)
        start = end


def test_mixed_step_of_prefill_and_decode() -> None:
    """One forward holding a decode token of sequence A and a prefill chunk of sequence B."""
    gen = torch.Generator().manual_seed(2)
    a, b = qkv(6, gen), qkv(5, gen)
    cache = torch.zeros(2, 8, BLOCK, KV_HEADS, DIM)
    tables = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)

    def slots(row: int, lo: int, hi: int) -> list[int]:
        return [int(tables[row, i // BLOCK]) * BLOCK + i % BLOCK for i in range(lo, hi)]

    # step 1: A's first 5 tokens alone
    meta = AttentionMetadata([0, 5], [5], torch.tensor(slots(0, 0, 5)), tables[:1], BLOCK)
    sdpa_attention(a[0][:5], a[1][:5], a[2][:5], meta, DIM**-0.5, cache)
    # step 2: A's 6th token (decode) and all of B (prefill) together
    q = torch.cat([a[0][5:], b[0]])
    k = torch.cat([a[1][5:], b[1]])
    v = torch.cat([a[2][5:], b[2]])
    meta = AttentionMetadata([0, 1, 6], [6, 5], torch.tensor(slots(0, 5, 6) + slots(1, 0, 5)),
                             tables, BLOCK)
    out = sdpa_attention(q, k, v, meta, DIM**-0.5, cache)
    torch.testing.assert_close(out[:1], naive(*a)[5:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], naive(*b), rtol=1e-5, atol=1e-5)


def test_batched_decode_of_several_sequences_with_a_prefill_chunk() -> None:
    """Three decode tokens (contexts of different lengths, scattered blocks, stale values in the
    unused slots) go through one batched call; a prefill chunk in the same step goes alone."""
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 2, 12]
    seqs = [qkv(n, gen) for n in lengths]
    prefill = qkv(6, gen)
    cache = torch.randn(2, 16, BLOCK, KV_HEADS, DIM, generator=gen)  # stale, finite
    tables = torch.tensor([[9, 4, 0], [3, 0, 0], [1, 15, 6], [11, 12, 0]], dtype=torch.int32)

    def slots(row: int, lo: int, hi: int) -> list[int]:
        return [int(tables[row, i // BLOCK]) * BLOCK + i % BLOCK for i in range(lo, hi)]

    for row, (q, k, v) in enumerate(seqs):  # every context but the last token, one by one
        n = lengths[row] - 1
        meta = AttentionMetadata([0, n], [n], torch.tensor(slots(row, 0, n)), tables[row:row + 1],
                                 BLOCK)
        sdpa_attention(q[:n], k[:n], v[:n], meta, DIM**-0.5, cache)
    q = torch.cat([s[0][-1:] for s in seqs] + [prefill[0]])
    k = torch.cat([s[1][-1:] for s in seqs] + [prefill[1]])
    v = torch.cat([s[2][-1:] for s in seqs] + [prefill[2]])
    all_slots = [x for r, n in enumerate(lengths) for x in slots(r, n - 1, n)] + slots(3, 0, 6)
    meta = AttentionMetadata([0, 1, 2, 3, 9], [*lengths, 6], torch.tensor(all_slots), tables,
                             BLOCK)
    batch = meta.decode_batch()
    assert batch is not None and batch.seqs == [0, 1, 2]
    out = sdpa_attention(q, k, v, meta, DIM**-0.5, cache)
    for row, s in enumerate(seqs):
        torch.testing.assert_close(out[row:row + 1], naive(*s)[-1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3:], naive(*prefill), rtol=1e-5, atol=1e-5)


def test_metadata_rejects_inconsistent_layouts() -> None:
    with pytest.raises(ValueError, match="one more entry"):
        AttentionMetadata([0, 3], [3, 4])
    with pytest.raises(ValueError, match="more new tokens than context"):
        AttentionMetadata([0, 5], [3])
    with pytest.raises(ValueError, match="come together"):
        AttentionMetadata([0, 3], [3], slot_mapping=torch.arange(3))
    with pytest.raises(ValueError, match="whole context"):
        AttentionMetadata([0, 3], [5])  # cached context claimed, but no cache to hold it
