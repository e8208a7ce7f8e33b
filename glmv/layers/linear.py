"""Linear layers whose parameters know how checkpoint tensors load into them.

A packed layer (q/k/v -> qkv, gate/up -> gate_up) owns one weight made of named shards; the
loader hands each checkpoint tensor to `weight_loader(param, tensor, shard_id)`. Tensor
parallelism will shard these same classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ShapeMismatch(ValueError):
    """A checkpoint tensor does not fit its parameter (the loader adds the tensor's name)."""

    def __init__(self, got: tuple[int, ...], want: tuple[int, ...]) -> None:
        super().__init__(f"shape {list(got)} does not fit {list(want)}")
        self.got = got
        self.want = want


def copy_checked(target: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy `loaded` into `target` (casting dtype) after checking the shapes agree."""
    if target.shape != loaded.shape:
        raise ShapeMismatch(tuple(loaded.shape), tuple(target.shape))
    target.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T + b, with W [out_features, in_features] as in checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked along the output dimension.

    `shard_sizes` maps a shard id (e.g. "q", "k", "v" or 0, 1) to its output width, in order.
    """

    def __init__(self, in_features: int, shard_sizes: Sequence[tuple[object, int]],
                 bias: bool = False) -> None:
        super().__init__(in_features, sum(size for _, size in shard_sizes), bias)
        self.shard_offsets: dict[object, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shard_sizes:
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_shard  # type: ignore[attr-defined]
                param.shard_ids = tuple(self.shard_offsets)  # type: ignore[attr-defined]

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object) -> None:
        offset, size = self.shard_offsets[shard_id]
        copy_checked(param.data.narrow(0, offset, size), loaded)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Split an output [..., out_features] back into its shards, in order."""
        return list(y.split([size for _, size in self.shard_offsets.values()], dim=-1))
