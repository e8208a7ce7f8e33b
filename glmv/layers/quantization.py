"""W8A8 int8 quantization of the decoder's linear layers (`--quantization int8`).

Weights: symmetric int8 per output channel (scale = max |w[n, :]| / 127), quantized once after
loading from whatever the checkpoint holds (bf16, or FP8 dequantized). Activations: symmetric
int8 per token, quantized inside each product. The product is the CPU kernel
`torch.ops.glmv.int8_linear` (AVX512-VNNI: 64 int8 products per instruction, and half the
bytes of bf16 weights to stream), which takes the weights in VNNI blocks of 16 channels x 4
inputs.

Quantized: the decoder's dense products (attention q/k/v and o, the MLPs and shared experts),
the LM head (unless tied to the embeddings), and the vision tower's linear layers (attention,
MLP, patch merger: compute-bound work, where int8 products run ~1.4x bf16 ones). The routed
experts (grouped products, left for later), the embeddings and the tower's patch embedding
and downsample convolutions stay in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glmv.errors import ConfigError
from glmv.kernels import get_ops
from glmv.layers.linear import LANES, Linear, lane_blocks, lane_rows, pad_channels

#: Inputs per 32-bit lane in the int8 kernel's lane blocks (16 channels x 4 inputs per line).
QUAD = 4
QUANTIZATION_METHODS = ("int8",)


@dataclass(frozen=True)
class Int8Weight:
    """A linear layer's weight as int8 with per-channel scales, in the kernel's layout."""

    blocks: torch.Tensor  # int8 [Np / 16, Kp / 4, 16, 4]: w[16 b + l, 4 q + t] at [b, q, l, t]
    scale: torch.Tensor  # float32 [Np] (padding channels 1)
    row_sum: torch.Tensor  # int32 [Np]: each channel's sum of weights (the unsigned offset)
    bias: torch.Tensor | None  # float32 [Np]
    in_features: int  # K
    out_features: int  # N

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Weight:
        w = weight.detach().float()
        n, k = w.shape
        scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        blocks = lane_blocks(q, QUAD)
        np_ = blocks.shape[0] * LANES
        return cls(blocks, pad_channels(scale, np_, 1.0),
                   pad_channels(q.sum(dim=1, dtype=torch.int32), np_, 0),
                   None if bias is None else pad_channels(bias.detach().float(), np_, 0.0), k, n)

    def rows(self) -> torch.Tensor:
        """The int8 weight as rows again, [N, K]."""
        return lane_rows(self.blocks, self.out_features, self.in_features)

    def kernel_args(self) -> list[torch.Tensor | None]:
        return [self.blocks, self.bias, self.scale, self.row_sum]

    def dequantized(self) -> torch.Tensor:
        """The weight these int8 rows stand for, float32 [N, K]."""
        return self.rows().float() * self.scale[:self.out_features, None]

    def apply(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """x [..., K] bf16 -> [..., N] bf16 (plus the bias unless `with_bias` is False: a
        row-parallel layer adds it once, after its all-reduce)."""
        rows = x.reshape(-1, self.in_features)
        bias = self.bias if with_bias else None
        ops = get_ops()
        if ops is not None:
            y = ops.int8_linear(rows, self.blocks, self.scale, self.row_sum, bias,
                                self.out_features)
        else:
            y = self.reference(rows, bias)
        return y.view(*x.shape[:-1], self.out_features)

    def reference(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """What the kernel computes, in PyTorch (float64 sums, so exact up to the last
        rounding): the fallback when the kernels are unavailable, and the tests' oracle."""
        x = rows.float()
        sx = x.abs().amax(dim=1).div(127)
        sx = torch.where(sx > 0, sx, torch.ones_like(sx))
        xq = torch.round(x * (1 / sx)[:, None])
        n = self.out_features
        y = (xq.double() @ self.rows().double().t()) * sx[:, None].double()
        y = y * self.scale[None, :n].double()
        if bias is not None:
            y = y + bias[:n].double()
        return y.to(rows.dtype)


def check_quantization(method: str | None, dtype: torch.dtype, device: torch.device) -> None:
    """Refuse combinations the int8 path does not run (before any weight is touched)."""
    if method is None:
        return
    if method not in QUANTIZATION_METHODS:
        raise ConfigError(f"unknown quantization {method!r}; choose from "
                          f"{', '.join(QUANTIZATION_METHODS)}")
    if device.type != "cpu":
        raise ConfigError("--quantization int8 runs on the CPU only (its kernel is AVX512-VNNI)")
    if dtype is not torch.bfloat16:
        raise ConfigError(f"--quantization int8 computes in bfloat16; got --dtype {dtype}")


def quantize_linear_layers(module: nn.Module) -> int:
    """Give every `Linear` under `module` int8 weights and release its float weight; returns
    the number of layers quantized."""
    count = 0
    for layer in module.modules():
        if isinstance(layer, Linear) and layer.packed is None:
            layer.packed = Int8Weight.quantize(layer.weight, layer.bias)
            layer.weight.data = torch.empty(0, dtype=layer.weight.dtype)
            count += 1
    return count
