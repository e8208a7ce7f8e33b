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

        # oneDNN's blocked copy of the weight (see pack_linear_weights); None = plain F.linear.
        self.packed_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_weight is not None:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features),
                                                   self.packed_weight, self.bias, "none", [], "")
            return y.view(*x.shape[:-1], self.out_features)
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


#: Batch size oneDNN tunes the packed layout for (decode batches; prefill is compute-bound).
PACKING_BATCH_HINT = 64


def can_pack(weight: torch.Tensor) -> bool:
    """bf16 weights on a CPU whose torch build has oneDNN's packed linear kernels."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack_linear_weights(model: nn.Module) -> int:
    """Give every bf16 `Linear` on CPU a oneDNN-packed copy of its weight and use it from now
    on; the plain weight is then released unless another module shares it (tied embeddings).

    Why: oneDNN re-lays the plain [out, in] weight out on every call; the packed layout streams
    it once, which on AVX-512 machines makes decode-sized products (a few rows) 1.5-2x faster.
    Returns the number of layers packed. Loading weights must happen before this.
    """
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    count = 0
    for module in model.modules():
        if not isinstance(module, Linear) or module.packed_weight is not None:
            continue
        weight = module.weight
        if not can_pack(weight):
            continue
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(),
                                                                     PACKING_BATCH_HINT)
        if uses[id(weight)] == 1:
            weight.data = torch.empty(0, dtype=weight.dtype)
        count += 1
    return count
