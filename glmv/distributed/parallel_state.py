"""Process groups for tensor parallelism, over torch.distributed (gloo on CPU, NCCL on CUDA).

One process per rank. `init_distributed` joins the world (torchrun's environment variables or
an explicit init method) and makes the whole world the tensor-parallel group; layers built
afterwards read their rank and group size from `get_tp_group()`. Without it, every process is
a group of one and the collectives are no-ops, so single-device code runs unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from glmv.errors import ConfigError


@dataclass(frozen=True)
class TPGroup:
    """This process's place in its tensor-parallel group, and the group's collectives."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # None: the default group (or, size 1, none)
    # MoE experts: False splits every expert's intermediate width over the ranks (tensor
    # parallel); True places whole experts on ranks, num_experts / size each (expert parallel).
    expert_parallel: bool = False
    # The vision tower: False splits it over the ranks like the decoder ("weights", vLLM's
    # --mm-encoder-tp-mode default); True keeps it whole on every rank, each rank encodes a
    # share of a step's images and the embeddings are gathered ("data").
    encoder_data_parallel: bool = False

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the group, in place; returns it."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' `x` concatenated along `dim`, in rank order (same shape on every rank)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def all_gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """The ranks' `x` stacked along dim 0 in rank order, rank r's having `sizes[r]` rows.

        Each share is padded to the largest for the gather: gloo's all_gather wants one shape
        on every rank.
        """
        if self.size == 1:
            return x
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:rows] for part, rows in zip(parts, sizes, strict=True)])

    def all_to_all(self, x: torch.Tensor, send_sizes: list[int] | None = None,
                   recv_sizes: list[int] | None = None) -> torch.Tensor:
        """Rank r gets the next `send_sizes[r]` rows of `x`; returns the rows the ranks sent
        here, in rank order, `recv_sizes[r]` of them from rank r. None: equal shares.

        Every rank must call it, even with nothing to send or receive.
        """
        if self.size == 1:
            return x
        rows = x.shape[0] if recv_sizes is None else sum(recv_sizes)
        out = x.new_empty((rows, *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_sizes, send_sizes, group=self.group)
        return out

    def shard(self, total: int, what: str) -> int:
        """`total` split evenly over the group: this rank's share; ConfigError if uneven."""
        if total % self.size:
            raise ConfigError(f"{what} ({total}) is not divisible by the tensor-parallel size "
                              f"({self.size})")
        return total // self.size


_TP = TPGroup()


def get_tp_group() -> TPGroup:
    return _TP


@contextlib.contextmanager
def assumed_group(group: TPGroup) -> Iterator[None]:
    """Layers built inside take `group` as their tensor-parallel group, without any process
    group behind it: for checking that a model splits over N ranks before starting them
    (collectives would fail in here; only construction is meant)."""
    global _TP
    old, _TP = _TP, group
    try:
        yield
    finally:
        _TP = old


def init_distributed(world_size: int | None = None, rank: int | None = None,
                     init_method: str = "env://", backend: str | None = None,
                     enable_expert_parallel: bool = False,
                     mm_encoder_tp_mode: str = "weights",
                     timeout: timedelta | None = None) -> TPGroup:
    """Join the process group and make it the tensor-parallel group.

    `world_size` / `rank` default to $WORLD_SIZE / $RANK (torchrun); `backend` to NCCL when
    CUDA is available, else gloo. A world of one needs no process group at all.
    `enable_expert_parallel`: MoE experts are placed whole on ranks instead of each split.
    `mm_encoder_tp_mode`: "weights" splits the vision tower over the ranks, "data" replicates
    it and shares the images out. `timeout`: how long one collective may wait (torch's
    default when None).
    """
    global _TP
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} does not fit a world of size {world_size}")
    if mm_encoder_tp_mode not in ("weights", "data"):
        raise ConfigError(f"mm_encoder_tp_mode must be 'weights' or 'data', got "
                          f"{mm_encoder_tp_mode!r}")
    if world_size == 1:
        _TP = TPGroup()
        return _TP
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend, init_method=init_method, world_size=world_size,
                                rank=rank, timeout=timeout)
    # group None: the collectives use the default (whole-world) group. Holding no reference to
    # it keeps its lifetime torch's own: a process-group object that outlives
    # destroy_process_group (say, in a layer freed only at exit) is torn down after gloo's
    # transport and aborts the process.
    _TP = TPGroup(rank=dist.get_rank(), size=dist.get_world_size(), group=None,
                  expert_parallel=enable_expert_parallel,
                  encoder_data_parallel=mm_encoder_tp_mode == "data")
    return _TP


def destroy_distributed(barrier: bool = True) -> None:
    """Leave the process group (if any); the tensor-parallel group is one process again.
    `barrier=False` when a peer is known to be gone (there is nobody to meet)."""
    global _TP
    if dist.is_initialized():
        # Every rank gets here before any tears its connections down: a rank that left while
        # a peer was still in a collective would make the peer's transport abort the process.
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
    _TP = TPGroup()
