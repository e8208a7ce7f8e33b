"""Packed bf16 Linear weights (glmv's bf16 blocks, or oneDNN's layout) compute what F.linear
computes, free the plain weight, and leave shared (tied) weights in place."""

from __future__ import annotations

from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmv.layers import linear
from glmv.layers.linear import (
    Bf16Blocks,
    KernelEqualsStride,
    Linear,
    MergedLinear,
    OneDnnWeight,
    can_pack,
    pack_linear_weights,
)

M = TypeVar("M", bound=nn.Module)

pytestmark = pytest.mark.skipif(not can_pack(torch.empty(1, dtype=torch.bfloat16)),
                                reason="neither glmv's bf16 kernel nor oneDNN's packed linear "
                                       "kernels run on this machine")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = MergedLinear(64, [("q", 32), ("k", 16), ("v", 16)], bias=True)
        self.out = Linear(64, 47)
        self.embed = nn.Embedding(47, 64)
        self.head = Linear(64, 47)
        self.head.weight = self.embed.weight  # tied, as tie_word_embeddings does


def _random_bf16(model: M) -> M:
    """`model` in bf16 with every parameter drawn from N(0, 1) (seeded)."""
    torch.manual_seed(0)
    model = model.to(torch.bfloat16)
    for p in model.parameters():
        nn.init.normal_(p)
    return model


@pytest.mark.parametrize("layout", ["best", "onednn"])
def test_packed_layers_match_f_linear_and_release_weights(layout: str,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    if layout == "onednn":
        if not linear.onednn_packing():
            pytest.skip("this torch build has no oneDNN packed linear kernels")
        monkeypatch.setattr(linear, "bf16_blocks_native", lambda: False)
    model = _random_bf16(Tiny())
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16)  # any leading shape
    want = {name: F.linear(x, m.weight, m.bias) for name, m in
            (("qkv", model.qkv), ("out", model.out), ("head", model.head))}
    want_no_bias = F.linear(x, model.qkv.weight)
    assert pack_linear_weights(model) == 3
    assert pack_linear_weights(model) == 0  # idempotent
    expected = OneDnnWeight if layout == "onednn" or not linear.bf16_blocks_native() \
        else Bf16Blocks
    for name, module in (("qkv", model.qkv), ("out", model.out), ("head", model.head)):
        assert isinstance(module.packed, expected)
        got = module(x)
        assert got.shape == want[name].shape
        torch.testing.assert_close(got.float(), want[name].float(), rtol=1e-2, atol=5e-2)
    assert model.qkv.weight.numel() == 0 and model.out.weight.numel() == 0
    assert model.embed.weight.numel() == 47 * 64  # shared with the head: kept
    assert model.qkv.split(model.qkv(x))[1].shape == (5, 3, 16)
    # a row-parallel layer leaves the bias out of the product and adds it after its reduce
    assert model.qkv.packed is not None
    torch.testing.assert_close(model.qkv.packed.apply(x, with_bias=False).float(),
                               want_no_bias.float(), rtol=1e-2, atol=5e-2)


def test_kernel_equals_stride_layers_are_packed_as_products() -> None:
    """The vision tower's patch embedding and downsample (convolutions as one matmul) take the
    packed product too, from their [out, in, *kernel] weights."""
    layer = _random_bf16(KernelEqualsStride(40, (3, 2, 14, 14)))
    x = torch.randn(70, 3 * 2 * 14 * 14)  # float pixels: the layer casts them
    want = F.linear(x.bfloat16(), layer.weight.flatten(1), layer.bias)
    assert pack_linear_weights(layer) == 1
    assert isinstance(layer.packed, Bf16Blocks if linear.bf16_blocks_native() else OneDnnWeight)
    assert layer.weight.numel() == 0
    got = layer(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=5e-2)


def test_bf16_blocks_keep_the_weight_and_pad_to_whole_blocks() -> None:
    w = torch.randn(37, 19).bfloat16()
    b = torch.randn(37).bfloat16()
    packed = Bf16Blocks.pack(w, b)
    assert packed.blocks.shape == (3, 16, 16, 2)  # K 19 -> 32 inputs: one whole AMX tile
    assert torch.equal(packed.rows(), w)
    assert not packed.blocks.transpose(1, 2).reshape(48, 32)[:, 19:].any()
    assert packed.bias is not None and packed.bias.dtype == torch.float32
    assert packed.bias.shape == (48,) and torch.equal(packed.bias[:37], b.float())
    x = torch.randn(4, 19).bfloat16()
    torch.testing.assert_close(packed.apply(x).float(), F.linear(x, w, b).float(), rtol=1e-2,
                               atol=5e-2)


def test_float32_weights_are_not_packed() -> None:
    model = Tiny()
    assert pack_linear_weights(model) == 0
    assert model.out.packed is None and model.out.weight.numel() == 47 * 64


class Tower(nn.Module):
    many_rows = True  # as the vision tower declares: never a decode-sized batch

    def __init__(self) -> None:
        super().__init__()
        self.proj = Linear(64, 32, bias=True)


class WithTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = Tower()
        self.head = Linear(64, 48)


@pytest.mark.parametrize("onednn_wins", [True, False])
def test_many_rows_modules_take_onednn_where_it_wins(onednn_wins: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers inside a `many_rows` module take oneDNN's layout where it is the faster product
    for many rows (AMX); the rest, and everything elsewhere, the usual layout."""
    if onednn_wins and not linear.onednn_packing():
        pytest.skip("this torch build has no oneDNN packed linear kernels")
    monkeypatch.setattr(linear, "onednn_for_many_rows", lambda: onednn_wins)
    model = _random_bf16(WithTower())
    x = torch.randn(300, 64, dtype=torch.bfloat16)
    want = F.linear(x, model.tower.proj.weight, model.tower.proj.bias)
    assert pack_linear_weights(model) == 2
    usual = Bf16Blocks if linear.bf16_blocks_native() else OneDnnWeight
    assert isinstance(model.tower.proj.packed, OneDnnWeight if onednn_wins else usual)
    assert isinstance(model.head.packed, usual)
    torch.testing.assert_close(model.tower.proj(x).float(), want.float(), rtol=1e-2, atol=5e-2)


def test_many_rows_swiglu_projection_keeps_its_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a `many_rows` module where oneDNN wins the plain products, a [gate | up] projection
    still takes glmv's SwiGLU blocks (their fused activation beats oneDNN's product plus a
    separate pass); the module's other layers take oneDNN's layout."""
    if not (linear.onednn_packing() and linear.bf16_blocks_native()):
        pytest.skip("needs both oneDNN's packed kernels and glmv's AVX-512 blocks")
    from glmv.layers.mlp import GatedMLP

    class MlpTower(nn.Module):
        many_rows = True

        def __init__(self) -> None:
            super().__init__()
            self.mlp = GatedMLP(64, 40)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = MlpTower()

    monkeypatch.setattr(linear, "onednn_for_many_rows", lambda: True)
    model = _random_bf16(Model())
    tower = model.tower
    x = torch.randn(300, 64, dtype=torch.bfloat16)
    want = tower.mlp(x)
    assert pack_linear_weights(model) == 2
    assert isinstance(tower.mlp.gate_up_proj.packed, Bf16Blocks)
    assert tower.mlp.gate_up_proj.packed.swiglu
    assert isinstance(tower.mlp.down_proj.packed, OneDnnWeight)
    torch.testing.assert_close(tower.mlp(x).float(), want.float(), rtol=2e-2, atol=2e-2)


def test_swiglu_blocks_pair_gate_and_up_channels() -> None:
    """A [gate | up] weight in SwiGLU pairs: each half padded to whole blocks, blocks
    alternating gate, up; the rows, the product and its bias come back in [gate | up] order."""
    width, k = 21, 19  # 21 channels: one whole block and a padded one per half
    w = torch.randn(2 * width, k).bfloat16()
    b = torch.randn(2 * width)
    packed = Bf16Blocks.pack(w, b, swiglu=True)
    assert packed.swiglu and packed.out_features == 2 * width
    assert packed.blocks.shape == (4, 16, 16, 2)
    blocks = packed.blocks.transpose(1, 2).reshape(4, 16, 32)[:, :, :k]
    assert torch.equal(blocks[0], w[:16]) and torch.equal(blocks[1], w[width:width + 16])
    assert torch.equal(blocks[2, :5], w[16:width]) and not blocks[2, 5:].any()
    assert torch.equal(blocks[3, :5], w[width + 16:]) and not blocks[3, 5:].any()
    assert packed.bias is not None
    assert torch.equal(packed.bias[16:32], b[width:width + 16])
    assert torch.equal(packed.rows(), w)
    x = torch.randn(3, k).bfloat16()
    plain = Bf16Blocks.pack(w, b)
    if linear.bf16_blocks_native():
        assert torch.equal(packed.apply(x), plain.apply(x))
    torch.testing.assert_close(packed.apply(x).float(), F.linear(x, w, b.bfloat16()).float(),
                               rtol=1e-2, atol=5e-2)


@pytest.mark.skipif(not linear.bf16_blocks_native(),
                    reason="SwiGLU pairs are glmv's bf16 blocks (AVX-512)")
def test_gated_mlp_packs_gate_up_in_swiglu_pairs() -> None:
    """GatedMLP's gate_up takes SwiGLU pairs: its output is silu(gate) * up of one pass, bit
    for bit what silu_and_mul gives over the [gate | up] product of the usual blocks."""
    from glmv.layers.activation import silu_and_mul
    from glmv.layers.mlp import GatedMLP

    mlp = _random_bf16(GatedMLP(64, 40))
    gate_up, down = mlp.gate_up_proj.weight.detach().clone(), mlp.down_proj.weight.detach()
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    assert pack_linear_weights(mlp) == 2
    packed = mlp.gate_up_proj.packed
    assert isinstance(packed, Bf16Blocks) and packed.swiglu
    usual = Bf16Blocks.pack(gate_up, None)
    act = silu_and_mul(usual.apply(x))
    assert torch.equal(mlp.gate_up_proj.swiglu(x), act)
    assert torch.equal(mlp(x), mlp.down_proj(act))
    torch.testing.assert_close(mlp(x).float(), F.linear(act, down).float(), rtol=1e-2,
                               atol=5e-2)
