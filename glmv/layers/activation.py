"""Activations of the GLM-V MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmv.kernels import cpu_ops


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU on a fused [..., 2 * I] gate/up projection: silu(gate) * up."""
    ops = cpu_ops(x)
    if ops is not None and x.dim() == 2 and x.stride(-1) == 1:
        return ops.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
