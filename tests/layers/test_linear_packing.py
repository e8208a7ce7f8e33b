"""oneDNN-packed bf16 Linear weights compute what F.linear computes, free the plain weight,
and leave shared (tied) weights in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmv.layers.linear import Linear, MergedLinear, can_pack, pack_linear_weights

pytestmark = pytest.mark.skipif(not can_pack(torch.empty(1, dtype=torch.bfloat16)),
                                reason="this torch build has no oneDNN packed linear kernels")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = MergedLinear(64, [("q", 32), ("k", 16), ("v", 16)], bias=True)
        self.out = Linear(64, 48)
        self.embed = nn.Embedding(48, 64)
        self.head = Linear(64, 48)
        self.head.weight = self.embed.weight  # tied, as tie_word_embeddings does


def test_packed_layers_match_f_linear_and_release_weights() -> None:
    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    for p in model.parameters():
        nn.init.normal_(p)
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16)  # any leading shape
    want = {name: F.linear(x, m.weight, m.bias) for name, m in
            (("qkv", model.qkv), ("out", model.out), ("head", model.head))}
    assert pack_linear_weights(model) == 3
    assert pack_linear_weights(model) == 0  # idempotent
    for name, module in (("qkv", model.qkv), ("out", model.out), ("head", model.head)):
        got = module(x)
        assert got.shape == want[name].shape
        torch.testing.assert_close(got.float(), want[name].float(), rtol=1e-2, atol=5e-2)
    assert model.qkv.weight.numel() == 0 and model.out.weight.numel() == 0
    assert model.embed.weight.numel() == 48 * 64  # shared with the head: kept
    assert model.qkv.split(model.qkv(x))[1].shape == (5, 3, 16)


def test_float32_weights_are_not_packed() -> None:
    model = Tiny()
    assert pack_linear_weights(model) == 0
    assert model.out.packed_weight is None and model.out.weight.numel() == 48 * 64
