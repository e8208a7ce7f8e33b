"""The fused CPU kernels against the PyTorch code they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmv import kernels
from glmv.attention import torch_sdpa
from glmv.attention.metadata import AttentionMetadata
from glmv.layers.norm import RMSNorm

ops = kernels.get_ops()
pytestmark = pytest.mark.skipif(ops is None, reason=f"CPU kernels not built: {kernels.status()}")

BF16 = torch.bfloat16


def _bf16(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(BF16)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place (same-sign values)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def _norm(width: int, seed: int) -> RMSNorm:
    norm = RMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=torch.Generator().manual_seed(seed)) + 0.5)
    return norm.to(BF16)


@pytest.mark.parametrize("width", [3, 65, 128, 1000, 1024, 1536, 4096, 4100, 8192])
def test_rms_norm_is_bit_equal_to_reference(width: int) -> None:
    """The sum of squares is added in ATen's order, so even a 1-ulp flip never happens (one
    would be enough to flip a near-tie MoE routing decision downstream)."""
    norm = _norm(width, seed=1)
    for rows in (1, 5, 70):
        g = torch.Generator().manual_seed(rows * width)
        x = (torch.randn(rows, width, generator=g) * torch.rand(rows, 1, generator=g) * 10)
        x = x.to(BF16)
        assert torch.equal(ops.rms_norm(x, norm.weight, norm.eps), norm.reference(x))
    # rows of a wider tensor (a stride other than the width)
    wide = _bf16(7, width + 40, seed=9)
    assert torch.equal(ops.rms_norm(wide[:, :width], norm.weight, norm.eps),
                       norm.reference(wide[:, :width].contiguous()))


def test_add_rms_norm_and_norm_add_match_reference() -> None:
    n_x, n_out = _norm(512, seed=2), _norm(512, seed=3)
    x, res = _bf16(40, 512, seed=4), _bf16(40, 512, seed=5, scale=4.0)
    h, out = ops.add_rms_norm(x, res, n_x.weight, n_out.weight, n_out.eps)
    assert torch.equal(h, res + n_x.reference(x))
    assert torch.equal(out, n_out.reference(h))
    h2, out2 = ops.add_rms_norm(x, res, None, n_out.weight, n_out.eps)
    assert torch.equal(h2, res + x)
    assert torch.equal(out2, n_out.reference(res + x))
    got = ops.norm_add(x, res, n_x.weight, n_x.eps)
    assert torch.equal(got, h)


def test_silu_and_mul_matches_reference() -> None:
    x = _bf16(7, 2 * 1536, seed=6, scale=4.0)
    gate, up = x.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    got = ops.silu_and_mul(x)
    # exp is a polynomial here: the silu may land one ulp away before the product rounds.
    assert _ulps(got, ref).max() <= 2
    assert (got != ref).float().mean() < 0.01


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_matches_reference(interleaved: bool) -> None:
    from glmv.layers.rotary import MRotaryEmbedding

    rotary = MRotaryEmbedding(64, 10000.0, (8, 12, 12), "interleaved" if interleaved else "neox")
    positions = torch.randint(0, 4000, (3, 9), generator=torch.Generator().manual_seed(7))
    cos, sin = rotary.cos_sin(positions, BF16)
    qkv = _bf16(9, 6 * 128, seed=8)  # 4 heads + 2 kv heads of 128, then nothing: rotate q | k
    expected = qkv.clone()
    view = expected.view(9, 6, 128)
    c, s = cos[:, None, :], sin[:, None, :]
    rot = view[..., :64]
    if interleaved:
        rotated = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((-rot[..., 32:], rot[..., :32]), dim=-1)
    rot.copy_(rot * c + rotated * s)
    ops.rotary_(qkv.view(9, 6, 128), cos, sin, interleaved)
    assert torch.equal(qkv, expected)


def test_vision_rotary_in_fp32_is_bit_equal_to_reference() -> None:
    """The vision tower's rotary (fp32 cos/sin, fp32 arithmetic) on the q and k heads of a
    fused qkv output, in place, equals VisionRotaryEmbedding.rotate bit for bit."""
    from glmv.layers.rotary import VisionRotaryEmbedding

    rotary = VisionRotaryEmbedding(128, 10000.0)
    hw = torch.randint(0, 40, (400, 2), generator=torch.Generator().manual_seed(3))
    cos, sin = rotary.cos_sin(hw)
    # 400 x 8 x 128 values: a few land on a bf16 rounding tie, where a fused multiply-add
    # (one rounding instead of two) would round the other way
    qkv = _bf16(400, 3 * 4 * 128, seed=4, scale=3.0).view(400, 12, 128)
    expected = qkv.clone()
    expected[:, :8] = VisionRotaryEmbedding.rotate(expected[:, :8], cos, sin)
    ops.rotary_(qkv[:, :8], cos, sin, False)
    assert torch.equal(qkv, expected)  # v heads untouched, q/k heads bit-equal
    with pytest.raises(RuntimeError, match="both be bfloat16 or both float32"):
        ops.rotary_(qkv[:, :8], cos, sin.to(BF16), False)


def _segment_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       lens: list[int]) -> torch.Tensor:
    out, start = [], 0
    for n in lens:
        qi, ki, vi = (t[start:start + n].double().transpose(0, 1) for t in (q, k, v))
        out.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("heads,head_dim,lens", [
    (4, 128, [1024]), (2, 16, [5, 70, 1]), (3, 48, [130, 64, 3]), (1, 80, [63, 65, 200]),
    (2, 24, [9, 33]),  # head_dim not a multiple of 16: the plain loops
])
def test_varlen_attention_matches_fp64_sdpa(heads: int, head_dim: int, lens: list[int],
                                            product_path: str) -> None:
    """Attention within segments only, as close to an fp64 reference as bf16 SDPA per segment
    (fp32 scores and softmax, bf16 probabilities and output), from strided q/k/v views."""
    n = sum(lens)
    qkv = _bf16(n, 3, heads, head_dim, seed=n + heads, scale=2.0)
    q, k, v = qkv.unbind(1)
    out = torch.full((n, heads, head_dim), float("nan"), dtype=BF16)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    ops.varlen_attention(out, q, k, v, cu, cu, head_dim**-0.5, False)
    ref = _segment_reference(q, k, v, lens)
    sdpa_err = (_segment_reference(q, k, v, lens).to(BF16).double() - ref).abs().max()
    for i, m in enumerate(lens):
        start = sum(lens[:i])
        sdpa = F.scaled_dot_product_attention(
            *(t[start:start + m].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        sdpa_err = max(sdpa_err, (sdpa.double() - ref[start:start + m]).abs().max())
    err = (out.double() - ref).abs().max()
    assert not out.isnan().any()
    assert err <= sdpa_err * 1.5 + 2e-3, (err, sdpa_err)


def test_varlen_attention_softmax_ignores_padded_keys(product_path: str) -> None:
    """Scores far below zero on every real key: the zero keys that pad a segment to the
    kernel's blocks (score 0) must not set the softmax's maximum, or every probability would
    underflow to zero."""
    lens = [40, 100]
    n = sum(lens)
    q = torch.full((n, 2, 64), 8.0, dtype=BF16)
    k = -_bf16(n, 2, 64, seed=7).abs() - 2.0  # every q . k below -2000 * scale
    v = _bf16(n, 2, 64, seed=8)
    cu = torch.tensor([0, 40, n])
    out = torch.full((n, 2, 64), float("nan"), dtype=BF16)
    ops.varlen_attention(out, q, k, v, cu, cu, 64**-0.5, False)
    ref = _segment_reference(q, k, v, lens)
    assert not out.isnan().any()
    assert (out.double() - ref).abs().max() <= 2e-2


def test_varlen_attention_keeps_segments_apart(product_path: str) -> None:
    """Changing one segment's keys and values leaves every other segment's output as it was."""
    lens = [40, 7, 90]
    qkv = _bf16(137, 3, 2, 32, seed=5)
    cu = torch.tensor([0, 40, 47, 137])
    first = torch.empty(137, 2, 32, dtype=BF16)
    ops.varlen_attention(first, *qkv.unbind(1), cu, cu, 32**-0.5, False)
    qkv[40:47, 1:] = _bf16(7, 2, 2, 32, seed=6)
    second = torch.empty_like(first)
    ops.varlen_attention(second, *qkv.unbind(1), cu, cu, 32**-0.5, False)
    assert torch.equal(first[:40], second[:40]) and torch.equal(first[47:], second[47:])
    assert not torch.equal(first[40:47], second[40:47])
    with pytest.raises(RuntimeError, match="cu_q must run from 0"):
        bad = torch.tensor([0, 40, 47, 136])
        ops.varlen_attention(second, *qkv.unbind(1), bad, bad, 1.0, False)
    assert len(lens) == 3


def _causal_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lq: list[int],
                      lk: list[int]) -> torch.Tensor:
    """fp64 SDPA per segment, each segment's queries the last of its keys (bottom-right)."""
    group = q.shape[1] // k.shape[1]
    out, qs, ks = [], 0, 0
    for nq, nk in zip(lq, lk, strict=True):
        qi = q[qs:qs + nq].double().transpose(0, 1)
        ki, vi = (t[ks:ks + nk].double().repeat_interleave(group, 1).transpose(0, 1)
                  for t in (k, v))
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
        out.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1))
        qs, ks = qs + nq, ks + nk
    return torch.cat(out)


# head_dim 128 and 64: the AVX-512 (or AMX) path where the CPU has it; 24: the plain loops.
@pytest.mark.parametrize("heads,kv_heads,head_dim,lq,lk", [
    (8, 2, 128, [272, 1, 40], [272, 1, 300]),  # whole prompts, one token, a chunk after 260
    (4, 4, 64, [9, 100], [9, 180]),
    (6, 2, 24, [5, 33], [12, 33]),
])
def test_causal_grouped_varlen_attention_matches_fp64(heads: int, kv_heads: int, head_dim: int,
                                                      lq: list[int], lk: list[int],
                                                      product_path: str) -> None:
    q = _bf16(sum(lq), heads, head_dim, seed=heads, scale=2.0)
    kv = _bf16(sum(lk), 2, kv_heads, head_dim, seed=kv_heads + 1, scale=2.0)
    k, v = kv.unbind(1)
    out = torch.full_like(q, float("nan"))
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()])
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()])
    ops.varlen_attention(out, q, k, v, cu_q, cu_k, head_dim**-0.5, True)
    ref = _causal_reference(q, k, v, lq, lk)
    # bf16 SDPA with the same mask (as the decoder ran before) against the same reference
    sdpa_err = torch.tensor(0.0, dtype=torch.float64)
    group = heads // kv_heads
    qs = ks = 0
    for nq, nk in zip(lq, lk, strict=True):
        mask = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
        got = F.scaled_dot_product_attention(
            q[qs:qs + nq].transpose(0, 1),
            *(t[ks:ks + nk].repeat_interleave(group, 1).transpose(0, 1) for t in (k, v)),
            attn_mask=mask).transpose(0, 1)
        sdpa_err = torch.maximum(sdpa_err, (got.double() - ref[qs:qs + nq]).abs().max())
        qs, ks = qs + nq, ks + nk
    assert not out.isnan().any()
    assert (out.double() - ref).abs().max() <= sdpa_err * 1.5 + 2e-3


def test_causal_varlen_attention_is_the_same_in_chunks(product_path: str) -> None:
    """On either kernel, a prompt's rows come out bit-equal whether it is run whole or as
    chunks after cached keys (a row's result depends on its own keys only)."""
    q = _bf16(150, 8, 128, seed=3, scale=2.0)
    k, v = _bf16(150, 2, 2, 128, seed=4, scale=2.0).unbind(1)
    whole = torch.empty_like(q)
    ops.varlen_attention(whole, q, k, v, torch.tensor([0, 150]), torch.tensor([0, 150]),
                         0.088, True)
    for start, end in [(0, 37), (37, 100), (100, 103), (103, 150)]:
        part = torch.empty_like(q[start:end])
        ops.varlen_attention(part, q[start:end], k[:end], v[:end], torch.tensor([0, end - start]),
                             torch.tensor([0, end]), 0.088, True)
        assert torch.equal(part, whole[start:end])


def test_write_kv_matches_index_copy() -> None:
    cache = torch.zeros(2, 6, 4, 2, 16, dtype=BF16)
    qkv = _bf16(5, (4 + 2 + 2) * 16, seed=10)
    k = qkv[:, 64:96].view(5, 2, 16)
    v = qkv[:, 96:].view(5, 2, 16)
    slots = torch.tensor([3, 9, 10, 22, 0])
    ops.write_kv(cache, k, v, slots)
    expected = torch.zeros_like(cache)
    expected[0].view(-1, 2, 16).index_copy_(0, slots, k)
    expected[1].view(-1, 2, 16).index_copy_(0, slots, v)
    assert torch.equal(cache, expected)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.write_kv(cache, k, v, torch.tensor([0, 1, 2, 3, 24]))


def _decode_case(lens: list[int], heads: int, kv_heads: int, seed: int, d: int = 64,
                 block_size: int = 4):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    cache = (torch.randn(2, num_blocks, block_size, kv_heads, d, generator=g)).to(BF16)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered blocks
    tables, used = [], 0
    for n in lens:
        need = -(-n // block_size)
        tables.append(perm[used:used + need])
        used += need
    width = max(len(t) for t in tables)
    block_tables = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    meta = AttentionMetadata(query_start_loc=list(range(len(lens) + 1)), seq_lens=lens,
                             slot_mapping=torch.zeros(len(lens), dtype=torch.long),
                             block_tables=block_tables, block_size=block_size)
    q = torch.randn(len(lens), heads, d, generator=g).to(BF16)
    return cache, meta, q


def _reference_attention(cache, meta, q, scale) -> torch.Tensor:
    outs = []
    for i, n in enumerate(meta.seq_lens):
        blocks = meta.block_tables[i, : -(-n // meta.block_size)].long()
        k = cache[0, blocks].flatten(0, 1)[:n].float()  # [n, kv, d]
        v = cache[1, blocks].flatten(0, 1)[:n].float()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(outs)


# head_dim 64 and 128 take the AVX-512 kernel where the CPU has it (groups of 4 query
# heads, a 16-head group as in GLM-4.1V, a 6-head one split 4 + 2), 48 the plain loops.
@pytest.mark.parametrize("heads,kv_heads,d,block_size,lens", [
    (8, 2, 64, 4, [2, 3, 4, 17, 50]),
    (4, 4, 64, 4, [2, 3, 4, 17, 50]),
    (6, 1, 64, 4, [2, 3, 4, 17, 50]),
    (32, 2, 128, 16, [2, 15, 16, 33, 300]),
    (8, 2, 128, 16, [3, 1500, 20, 1100, 9]),  # next rows capped at 1 MiB, then fed in part
    (8, 2, 96, 16, [5, 40]),
    (6, 2, 48, 4, [2, 3, 17, 50]),
])
def test_paged_decode_attention_matches_fp32_reference(heads: int, kv_heads: int, d: int,
                                                      block_size: int, lens: list[int]) -> None:
    cache, meta, q = _decode_case(lens, heads, kv_heads, seed=heads * 10 + kv_heads, d=d,
                                  block_size=block_size)
    batch = meta.decode_batch()
    assert batch is not None
    scale = d**-0.5
    out = torch.full_like(q, float("nan"))
    seq_idx = torch.arange(len(lens))
    ops.paged_decode_attention(out, q, cache, meta.block_tables, seq_idx, seq_idx,
                               torch.tensor(lens), scale)
    ref = _reference_attention(cache, meta, q, scale)
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=1e-2)  # one bf16 rounding
    # the PyTorch decode path (bf16 probabilities) lands as close to the same reference
    fallback = torch_sdpa._decode_attention(q, cache, batch, scale)
    assert (out.float() - ref).abs().max() <= (fallback.float() - ref).abs().max() + 1e-3


def test_paged_decode_attention_rejects_bad_blocks() -> None:
    cache, meta, q = _decode_case([5, 9], 4, 2, seed=1)
    tables = meta.block_tables.clone()
    tables[1, 1] = 999
    idx = torch.arange(2)
    with pytest.raises(RuntimeError, match="block id 999 out of range"):
        ops.paged_decode_attention(torch.empty_like(q), q, cache, tables, idx, idx,
                                   torch.tensor([5, 9]), 0.125)


def _lines_with_switch(code: str, switch: str) -> list[str]:
    """What `code` prints in a fresh interpreter with the environment switch `switch` at 0."""
    import os
    import subprocess
    import sys

    env = {**os.environ, switch: "0"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.splitlines()


def test_switch_off_falls_back_to_pytorch() -> None:
    code = ("import torch; from glmv import kernels; "
            "print(kernels.status()); print(kernels.cpu_ops(torch.ones(2, dtype=torch.bfloat16)))")
    assert _lines_with_switch(code, kernels.ENV_SWITCH) == [
        f"not used ({kernels.ENV_SWITCH}=0)", "None"]


def test_amx_switch_keeps_every_product_off_amx() -> None:
    code = ("from glmv import kernels; ops = kernels.get_ops(); print(kernels.amx()); "
            "print(list(ops.linear_amx_rows(8, 16)))")
    assert _lines_with_switch(code, kernels.AMX_SWITCH) == [
        "False", str([kernels.NEVER, kernels.NEVER])]


def test_build_failure_is_logged_and_falls_back(monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernels, "load", broken)
    monkeypatch.setattr(kernels._State, "tried", False)
    monkeypatch.setattr(kernels._State, "ops", None)
    monkeypatch.setattr(kernels._State, "error", None)
    with caplog.at_level("WARNING", logger="glmv.kernels"):
        assert kernels.get_ops() is None
        assert kernels.cpu_ops(torch.ones(2, dtype=BF16)) is None
    assert "no compiler here" in caplog.text
    assert kernels.status() == "not used (RuntimeError: no compiler here)"
    x = torch.ones(3, 8, dtype=BF16)
    assert torch.equal(_norm(8, 0)(x), _norm(8, 0).reference(x))  # the layer still works


@pytest.mark.parametrize("n", [1, 17, 32, 151552])
def test_argmax_rows_is_torch_argmax(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(9, n, generator=g).to(BF16)  # bf16: ties are common at this width
    x[1] = float("-inf")  # all -inf: index 0
    x[2, n // 2] = float("nan")
    x[2, n - 1] = float("nan")  # the first NaN wins
    x[3] = 1.0  # all equal: the first
    x[4, n - 1] = 100.0  # the maximum in the tail
    x[5, -1:] = float("nan")
    got = ops.argmax_rows(x)
    assert got.dtype == torch.long
    assert got.tolist() == x.float().argmax(dim=-1).tolist()
    # a strided view of rows (the logits of some rows only)
    assert ops.argmax_rows(x[::2]).tolist() == x[::2].float().argmax(dim=-1).tolist()


def test_argmax_rows_ties_in_different_lanes() -> None:
    x = torch.zeros(3, 64, dtype=BF16)
    x[0, 40], x[0, 3] = 5.0, 5.0  # lanes 8 and 3: index 3
    x[1, 17], x[1, 33] = 5.0, 5.0  # the same lane, later block: index 17
    x[2, 63], x[2, 31] = 2.0, 2.0
    assert ops.argmax_rows(x).tolist() == [3, 17, 31]


def _bf16_blocks(w: torch.Tensor) -> torch.Tensor:
    from glmv.layers.linear import Bf16Blocks

    return Bf16Blocks.pack(w, None).blocks


def _within_bf16_rounding(y: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> None:
    """y (bf16) is `ref` (float64) rounded once to bf16, up to fp32 summation error."""
    _, exponent = torch.frexp(ref.float())
    half_ulp = torch.ldexp(torch.ones_like(ref), exponent.double() - 9)  # 8 significant bits
    err = (y.double() - ref).abs()
    bound = half_ulp + 1e-6 * magnitude
    assert bool((err <= bound).all()), float((err - bound).max())


@pytest.mark.parametrize("m", [1, 2, 3, 5, 8, 9, 17, 33, 300])
@pytest.mark.parametrize("n,k", [(16, 2), (37, 19), (48, 64), (100, 1024)])
def test_bf16_linear_matches_fp64(m: int, n: int, k: int, product_path: str) -> None:
    x, w = _bf16(m, k, seed=m), _bf16(n, k, seed=n + k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(3))
    padded = torch.zeros(-(-n // 16) * 16)
    padded[:n] = bias
    ref = x.double() @ w.double().t()
    magnitude = x.double().abs() @ w.double().abs().t()
    y = ops.bf16_linear(x, _bf16_blocks(w), None, n)
    assert y.dtype == BF16 and y.shape == (m, n)
    _within_bf16_rounding(y, ref, magnitude)
    _within_bf16_rounding(ops.bf16_linear(x, _bf16_blocks(w), padded, n), ref + bias.double(),
                          magnitude + bias.double().abs())


def test_bf16_linear_takes_strided_rows_and_no_rows(product_path: str) -> None:
    for rows in (6, 20):  # below and past the rows that take AMX tiles (x copied into tiles)
        big, w = _bf16(rows, 80, seed=1), _bf16(33, 64, seed=2)
        x = big[:, 8:72]  # rows 80 apart
        y = ops.bf16_linear(x, _bf16_blocks(w), None, 33)
        _within_bf16_rounding(y, x.double() @ w.double().t(),
                              x.double().abs() @ w.double().abs().t())
    assert ops.bf16_linear(x[:0], _bf16_blocks(w), None, 33).shape == (0, 33)


def test_bf16_linear_over_panels_and_row_buffers(product_path: str) -> None:
    """Rows split between the threads and taller than a thread's panel (512 rows of K = 1024
    stay in its L2), with an odd number of channel blocks (n = 40: the last block has no
    pair), x beyond the 32 MiB row buffer a thread keeps (then allocated for the call), and a
    short product after both (the kept buffer reused, channels split): each matches fp64."""
    for m, k, n in [(1100, 1024, 40), (4100, 4096, 20), (3, 1024, 40)]:
        x, w = _bf16(m, k, seed=m), _bf16(n, k, seed=n + k)
        y = ops.bf16_linear(x, _bf16_blocks(w), None, n)
        _within_bf16_rounding(y, x.double() @ w.double().t(),
                              x.double().abs() @ w.double().abs().t())


@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 40, 300])
@pytest.mark.parametrize("width,k", [(40, 64), (64, 1024)])
def test_bf16_linear_swiglu_is_silu_and_mul_of_the_product(m: int, width: int, k: int,
                                                            product_path: str) -> None:
    """One pass over SwiGLU pairs gives the same bits as silu_and_mul over the [gate | up]
    product, on every path (one row, AVX512 blocks, AMX tiles, K in stretches)."""
    from glmv.layers.linear import Bf16Blocks

    if not ops.bf16_linear_native():
        pytest.skip("SwiGLU pairs run on AVX-512 only (the plain loops have no such pass)")
    x, w = _bf16(m, k, seed=m), _bf16(2 * width, k, seed=width)
    bias = torch.randn(2 * width, generator=torch.Generator().manual_seed(5))
    for b in (None, bias):
        usual, pairs = Bf16Blocks.pack(w, b), Bf16Blocks.pack(w, b, swiglu=True)
        want = ops.silu_and_mul(ops.bf16_linear(x, usual.blocks, usual.bias, 2 * width))
        got = ops.bf16_linear_swiglu(x, pairs.blocks, pairs.bias, width)
        assert got.shape == (m, width)
        assert torch.equal(got, want)
    with pytest.raises(RuntimeError, match="gate/up pairs"):
        ops.bf16_linear_swiglu(x, pairs.blocks, None, 2 * width)


@pytest.mark.parametrize("m", [1, 3, 8, 16, 17, 40, 300])
# K = 1024 with more than 64 rows: pairs of blocks in stretches of K, each block of rows
# chosen from during the next one's last stretch
@pytest.mark.parametrize("n,k", [(37, 64), (1000, 256), (1000, 1024)])
def test_bf16_linear_argmax_is_argmax_rows_of_the_product(m: int, n: int, k: int,
                                                         product_path: str) -> None:
    """The greedy choice straight from the product is argmax_rows of the written product on
    every path: the same sums rounded the same way, the first of equal maxima (rows that
    tie across lanes, blocks and the threads' shares of the channels), the first NaN."""
    if not ops.bf16_linear_native():
        pytest.skip("the fused choice runs on AVX-512 only")
    x, w = _bf16(m, k, seed=m).abs(), _bf16(n, k, seed=n).abs() * 0.1
    w[n // 3] = w[n - 2] = w[5] = 1.0  # three equal largest outputs in every row: index 5
    if m > 2:
        x[1] = 0.0  # all outputs 0.0: index 0
        x[2] = -x[2]  # all negative: the padding channels past n (zero) must not count
    if n > 100:
        w[3 * n // 4] = float("nan")  # a NaN output in every row, after the maxima
    blocks = _bf16_blocks(w)
    want = ops.argmax_rows(ops.bf16_linear(x, blocks, None, n))
    got = ops.bf16_linear_argmax(x, blocks, n)
    assert got.dtype == torch.long and got.tolist() == want.tolist()
    assert want.tolist()[0] == (3 * n // 4 if n > 100 else 5)
    assert all(0 <= i < n for i in got.tolist())


def test_bf16_linear_rejects_blocks_of_another_shape() -> None:
    w = _bf16(32, 64)
    with pytest.raises(RuntimeError, match="must cover K"):
        ops.bf16_linear(_bf16(2, 66), _bf16_blocks(w), None, 32)
    with pytest.raises(RuntimeError, match="must cover N"):
        ops.bf16_linear(_bf16(2, 64), _bf16_blocks(w), None, 48)
    with pytest.raises(RuntimeError, match="blocks"):
        ops.bf16_linear(_bf16(2, 64), w, None, 32)
