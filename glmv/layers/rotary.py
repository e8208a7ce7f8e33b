"""Rotary position embeddings: 3-D M-RoPE for the decoder, 2-D rotary for the ViT.

M-RoPE: the rotary part of each head (rotary_dim = head_dim x partial_rotary_factor) has
rotary_dim / 2 frequencies; `mrope_section` = [s_t, s_h, s_w] says which position axis drives
which frequency:

    freq index:  0 .. s_t-1 | s_t .. s_t+s_h-1 | ... rotary_dim/2 - 1
    position:        t      |        h         |        w

glm4v pairs dimensions GPT-J style (x0,x1),(x2,x3)... ("interleaved"); glm4v_moe rotates the
two halves of the rotary part NeoX style. Dimensions past rotary_dim pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from glmv.kernels import cpu_ops


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MRotaryEmbedding(nn.Module):
    """Applies M-RoPE to q and k given positions[3, num_tokens] in (t, h, w) order."""

    inv_freq: torch.Tensor  # [rotary_dim / 2]
    freq_axis: torch.Tensor  # [rotary_dim / 2]: 0 = t, 1 = h, 2 = w drives that frequency

    def __init__(self, rotary_dim: int, theta: float, mrope_section: tuple[int, int, int],
                 style: str) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.interleaved = style == "interleaved"
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)
        axis = torch.cat([torch.full((s,), i % 3) for i, s in enumerate(mrope_section)])
        self.register_buffer("freq_axis", axis, persistent=False)  # [rotary_dim / 2]

    def cos_sin(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [num_tokens, rotary_dim], computed in fp32 then cast like the reference."""
        freqs = positions[..., None].float() * self.inv_freq  # [3, N, F]
        num_freqs = int(self.inv_freq.shape[0])
        freqs = freqs[self.freq_axis, :, torch.arange(num_freqs, device=freqs.device)]  # [F, N]
        freqs = freqs.transpose(0, 1)  # [N, F]
        cos, sin = freqs.cos(), freqs.sin()
        if self.interleaved:
            cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        else:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        return cos.to(dtype), sin.to(dtype)

    def forward(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotate q and k heads together, in place: qk [N, num_heads + num_kv_heads, head_dim]
        (a view of the fused qkv projection's output); cos/sin from cos_sin. One pass over both
        instead of two halves one pass saves a dozen small operator calls per layer."""
        ops = cpu_ops(qk)
        if ops is not None and qk.stride(-1) == 1 and cos.dtype is qk.dtype:
            ops.rotary_(qk, cos, sin, self.interleaved)
            return
        cos, sin = cos[:, None, :], sin[:, None, :]  # [N, 1, rotary_dim]
        rotate = _rotate_pairs if self.interleaved else _rotate_half
        rot = qk[..., : self.rotary_dim]
        rot.copy_(rot * cos + rotate(rot) * sin)


class VisionRotaryEmbedding(nn.Module):
    """2-D rotary of the ViT: head_dim/4 frequencies for the patch row, as many for the column.

    Angles [row freqs | col freqs] (head_dim / 2) are duplicated to the full head and applied
    NeoX style in fp32.
    """

    inv_freq: torch.Tensor  # [head_dim / 4]

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        spatial_dim = head_dim // 2
        exponents = torch.arange(0, spatial_dim, 2, dtype=torch.float) / spatial_dim
        self.register_buffer("inv_freq", 1.0 / (theta**exponents), persistent=False)

    def cos_sin(self, hw_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hw_positions: [N, 2] (row, col) -> cos, sin [N, head_dim] in fp32."""
        freqs = hw_positions[..., None].float() * self.inv_freq  # [N, 2, head_dim / 4]
        freqs = freqs.flatten(1)  # [N, head_dim / 2]: row freqs then col freqs
        freqs = torch.cat((freqs, freqs), dim=-1)
        return freqs.cos(), freqs.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [N, heads, head_dim]; cos/sin: [N, head_dim]."""
        xf = x.float()
        out = xf * cos[:, None] + _rotate_half(xf) * sin[:, None]
        return out.to(x.dtype)

    @staticmethod
    def rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """`rotate` in place (x may be a view, such as the q and k heads of a fused qkv
        output); one fused kernel call on bf16 CPU tensors, with the same fp32 arithmetic."""
        ops = cpu_ops(x)
        if ops is not None and x.stride(-1) == 1 and cos.dtype is torch.float32:
            ops.rotary_(x, cos, sin, False)
            return
        x.copy_(VisionRotaryEmbedding.rotate(x, cos, sin))
