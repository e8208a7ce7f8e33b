"""The SwiGLU MLP used throughout GLM-V: down(silu(gate(x)) * up(x))."""

from __future__ import annotations

import torch
from torch import nn

from glmv.distributed.parallel_state import TPGroup
from glmv.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    """gate and up projections packed into one `gate_up_proj` [2 * width, hidden], then down.

    `prepacked`: the checkpoint already stores `gate_up_proj` (the glm4v decoder); otherwise it
    stores `gate_proj` and `up_proj`, loaded as shards 0 and 1.
    """

    def __init__(self, hidden_size: int, width: int, prepacked: bool = False,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        # Split over the tensor-parallel group, `tp` or the default one (one all-reduce, in
        # down_proj); whole at size 1.
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [(0, width), (1, width)],
                                                       prepacked=prepacked, tp=tp)
        self.gate_up_proj.swiglu_pairs = True
        self.down_proj = RowParallelLinear(width, hidden_size, tp=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.swiglu(x))
