"""Normalisation layers, computed in float32 like the reference.

On bf16 CPU tensors the fused kernels of glmv.kernels do the same arithmetic in one call
(and fold in the residual adds around the norms); elsewhere plain PyTorch runs.
"""

from __future__ import annotations

import torch
from torch import nn

from glmv.kernels import cpu_ops


def _fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dim() == 2 and x.stride(-1) == 1 and weight.dtype is x.dtype


class RMSNorm(nn.Module):
    """RMSNorm with the reference's rounding: normalise in fp32, cast, then scale."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = cpu_ops(x)
        if ops is not None and _fusable(x, self.weight):
            return ops.rms_norm(x, self.weight, self.eps)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, norm_x: RMSNorm | None,
                 norm_out: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """h = residual + (norm_x(x) if norm_x else x); returns (h, norm_out(h))."""
    ops = cpu_ops(x)
    same = norm_x is None or (norm_x.weight.dtype is x.dtype and norm_x.eps == norm_out.eps)
    if (ops is not None and same and _fusable(x, norm_out.weight)
            and _fusable(residual, norm_out.weight)):
        return ops.add_rms_norm(x, residual, None if norm_x is None else norm_x.weight,
                                norm_out.weight, norm_out.eps)
    h = residual + (x if norm_x is None else norm_x.reference(x))
    return h, norm_out.reference(h)


def norm_add(x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm) -> torch.Tensor:
    """residual + norm(x)."""
    ops = cpu_ops(x)
    if ops is not None and _fusable(x, norm.weight) and _fusable(residual, norm.weight):
        return ops.norm_add(x, residual, norm.weight, norm.eps)
    return residual + norm.reference(x)
