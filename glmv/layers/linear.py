"""Linear layers whose parameters know how checkpoint tensors load into them.

A packed layer (q/k/v -> qkv, gate/up -> gate_up) owns one weight made of named shards; the
loader hands each checkpoint tensor to `weight_loader(param, tensor, shard_id)`. Tensor
parallelism will shard these same classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from glmv.checkpoint import LazyTensor, LoadedTensor
from glmv.distributed.parallel_state import TPGroup, get_tp_group
from glmv.errors import ConfigError
from glmv.kernels import get_ops
from glmv.kernels.memory import huge_page_copy
from glmv.layers.activation import silu_and_mul


class ShapeMismatch(ValueError):
    """A checkpoint tensor does not fit its parameter (the loader adds the tensor's name)."""

    def __init__(self, got: tuple[int, ...], want: tuple[int, ...]) -> None:
        super().__init__(f"shape {list(got)} does not fit {list(want)}")
        self.got = got
        self.want = want


def copy_checked(target: torch.Tensor, loaded: LoadedTensor) -> None:
    """Copy `loaded` into `target` (casting dtype) after checking the shapes agree; a lazy
    checkpoint tensor is read here, only the region copied."""
    if target.shape != loaded.shape:
        raise ShapeMismatch(tuple(loaded.shape), tuple(target.shape))
    target.copy_(loaded.materialize() if isinstance(loaded, LazyTensor) else loaded)


class Linear(nn.Module):
    """y = x W^T + b, with W [out_features, in_features] as in checkpoints."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

        # The weight in a kernel's layout, replacing the plain one (pack_linear_weights, or
        # int8 rows and scales for --quantization int8); None = plain F.linear.
        self.packed: PackedWeight | None = None
        # A [gate | up] projection that GatedMLP reads through `swiglu`: packed in SwiGLU
        # pairs where the layout allows, so that silu(gate) * up comes out of one pass.
        self.swiglu_pairs = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product(x, self.bias)

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this [gate | up] projection of x, [..., out_features / 2]."""
        if isinstance(self.packed, Bf16Blocks) and self.packed.swiglu:
            return self.packed.apply_swiglu(x)
        return silu_and_mul(self(x))

    def _product(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is not None:  # it keeps its own copy of the bias
            return self.packed.apply(x, with_bias=bias is not None)
        return F.linear(x, self.weight, bias)


class KernelEqualsStride(nn.Module):
    """A convolution whose kernel equals its stride: one matmul per output position.

    The weight keeps its convolution shape [out, in, *kernel] (checkpoint layout); inputs arrive
    already flattened in (in, *kernel) order. pack_linear_weights packs it as a [out, in *
    prod(kernel)] product like any Linear (on CPUs without AVX512-BF16 oneDNN's bf16 product
    runs at a fifth of glmv's blocks' speed).
    """

    def __init__(self, out_channels: int, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, *in_shape))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.packed: PackedWeight | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.packed is not None:
            return self.packed.apply(x)
        return F.linear(x, self.weight.flatten(1), self.bias)


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

    def _load_shard(self, param: nn.Parameter, loaded: LoadedTensor, shard_id: object) -> None:
        offset, size = self.shard_offsets[shard_id]
        copy_checked(param.data.narrow(0, offset, size), loaded)

    def _expect_stacked(self) -> None:
        """The checkpoint stores all projections stacked in one tensor, loaded with shard id
        None (see `_load_stacked`) instead of one tensor per projection."""
        for param in (self.weight, self.bias):
            if param is not None:
                param.shard_ids = (None,)  # type: ignore[attr-defined]

    def _load_stacked(self, param: nn.Parameter, loaded: LoadedTensor,
                      full_sizes: Sequence[int]) -> None:
        """A stacked checkpoint tensor whose projections are `full_sizes` rows long (whole,
        before any split over ranks): each loaded in turn as its own shard."""
        if loaded.shape[0] != sum(full_sizes):
            raise ShapeMismatch(tuple(loaded.shape), (sum(full_sizes), *param.shape[1:]))
        for piece, sid in zip(loaded.split(list(full_sizes), dim=0), self.shard_offsets,
                              strict=True):
            self._load_shard(param, piece, sid)

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        """Split an output [..., out_features] back into its shards, in order."""
        return list(y.split([size for _, size in self.shard_offsets.values()], dim=-1))


class PackedWeight(Protocol):
    """A linear layer's weight (and bias) in the layout of the kernel that multiplies it."""

    def apply(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """x [..., K] -> [..., N], plus the bias unless `with_bias` is False (a row-parallel
        layer adds it once, after its all-reduce)."""
        ...

    def kernel_args(self) -> list[torch.Tensor | None] | None:
        """The tensors glmv's fused kernels take for this weight (`decode_layers`' products:
        [blocks, bias] or [blocks, bias, scale, row_sum]); None where they cannot use it."""
        ...


#: Output channels per lane block of glmv's CPU products (int8 and bf16): one 64-byte line
#: holds 16 channels x the inputs of one 32-bit lane.
LANES = 16
#: Inputs per 32-bit lane in glmv's bf16 blocks.
BF16_PAIR = 2


def lane_blocks(weight: torch.Tensor, group: int) -> torch.Tensor:
    """A weight [N, K] in the lane blocks of glmv's CPU products: [Np / 16, Kp / group, 16,
    group] with w[16 b + l, group p + t] at [b, p, l, t], N and K padded with zeros.

    Kp is a multiple of 16 groups, so that every block divides into whole AMX tiles (16
    lines of 64 bytes: a B operand of TDPBF16PS or TDPBUSD as it lies in memory)."""
    n, k = weight.shape
    np_, kp = -(-n // LANES) * LANES, -(-k // (group * LANES)) * group * LANES
    padded = weight
    if (np_, kp) != (n, k):  # (no transient copy of a large weight that needs no padding)
        padded = weight.new_zeros(np_, kp)
        padded[:n, :k] = weight
    # In 2 MiB pages: every decode step streams these blocks whole (glmv.kernels.memory).
    return huge_page_copy(padded.view(np_ // LANES, LANES, kp // group, group).transpose(1, 2))


def lane_rows(blocks: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """`lane_blocks` undone: the weight as rows again, [N, K]."""
    rows = blocks.transpose(1, 2).reshape(blocks.shape[0] * LANES, -1)
    return rows[:out_features, :in_features]


def swiglu_order(values: torch.Tensor) -> torch.Tensor:
    """Rows (or entries) of a [gate | up] projection, 2 I of them, in the order of SwiGLU pairs:
    each half padded with zeros to Ip (16 I / 16 rounded up), then 16 gate rows, the same 16 up
    rows, the next 16 gate rows... (`Bf16Blocks.pack(..., swiglu=True)`)."""
    width = values.shape[0] // 2
    padded = -(-width // LANES) * LANES
    halves = values.new_zeros(2, padded, *values.shape[1:])
    halves[:, :width] = values.view(2, width, *values.shape[1:])
    return halves.view(2, padded // LANES, LANES, *values.shape[1:]).transpose(0, 1).reshape(
        2 * padded, *values.shape[1:])


def gate_up_order(values: torch.Tensor, width: int) -> torch.Tensor:
    """`swiglu_order` undone along the last dimension: [..., 2 Ip] -> [..., 2 I]."""
    pairs = values.shape[-1] // (2 * LANES)
    halves = values.reshape(*values.shape[:-1], pairs, 2, LANES).transpose(-3, -2)
    return halves.reshape(*values.shape[:-1], 2, pairs * LANES)[..., :width].reshape(
        *values.shape[:-1], 2 * width)


def pad_channels(values: torch.Tensor, size: int, fill: float) -> torch.Tensor:
    """A per-channel vector padded to `size` (the blocks' Np) with `fill`."""
    out = values.new_full((size,), fill)
    out[:values.numel()] = values
    return out


@dataclass(frozen=True)
class Bf16Blocks:
    """A bf16 weight in glmv's blocks for `torch.ops.glmv.bf16_linear` (AVX-512).

    For every 16 output channels the weight runs along the inputs a pair at a time, so a
    thread's share of the channels is one sequential stream: at decode sizes (one to a few
    rows) it reads the weights at the speed of a plain sum, faster than oneDNN's packed layout
    (docs/engine.md), and large batches run at the same bf16 peak as oneDNN's on AVX512-BF16
    (without it, on AVX512F multiply-adds at about 5x oneDNN's emulated bf16 product); on CPUs
    with AMX, batches of 8 rows or more run on tiles read from the same blocks.
    """

    blocks: torch.Tensor  # bf16 lane blocks [Np / 16, Kp / 2, 16, 2] (lane_blocks)
    bias: torch.Tensor | None  # float32 [Np]
    in_features: int  # K
    out_features: int  # N
    # A [gate | up] projection with its channels in SwiGLU pairs (swiglu_order), so that one
    # pass gives silu(gate) * up (`apply_swiglu`); `apply` still gives [gate | up].
    swiglu: bool = False

    @classmethod
    def pack(cls, weight: torch.Tensor, bias: torch.Tensor | None,
             swiglu: bool = False) -> Bf16Blocks:
        weight = weight.detach()
        out_features, in_features = weight.shape
        bias = None if bias is None else bias.detach().float()
        if swiglu:
            weight = swiglu_order(weight)
            bias = None if bias is None else swiglu_order(bias)
        blocks = lane_blocks(weight, BF16_PAIR)
        np_ = blocks.shape[0] * LANES
        fbias = None if bias is None else pad_channels(bias, np_, 0.0)
        return cls(blocks, fbias, in_features, out_features, swiglu)

    def rows(self) -> torch.Tensor:
        """The weight as rows again, [N, K]."""
        if self.swiglu:
            rows = lane_rows(self.blocks, self.blocks.shape[0] * LANES, self.in_features)
            return gate_up_order(rows.t(), self.out_features // 2).t()
        return lane_rows(self.blocks, self.out_features, self.in_features)

    def kernel_args(self) -> list[torch.Tensor | None]:
        return [self.blocks, self.bias]

    def apply(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        bias = self.bias if with_bias else None
        ops = get_ops()
        if ops is None:  # no glmv kernels in this process (blocks made by hand): the same product
            y = F.linear(rows, self.rows(), None if bias is None
                         else self._logical_bias(bias).to(rows.dtype))
        elif self.swiglu:
            interleaved = ops.bf16_linear(rows, self.blocks, bias, self.blocks.shape[0] * LANES)
            y = gate_up_order(interleaved, self.out_features // 2)
        else:
            y = ops.bf16_linear(rows, self.blocks, bias, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def apply_swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a `swiglu` projection, x [..., K] -> [..., N / 2]: the same bits
        as silu_and_mul(apply(x)), in one pass that never writes [gate | up] out."""
        width = self.out_features // 2
        ops = get_ops()
        if ops is None:
            return silu_and_mul(self.apply(x))
        y = ops.bf16_linear_swiglu(x.reshape(-1, self.in_features), self.blocks, self.bias,
                                   width)
        return y.view(*x.shape[:-1], width)

    def argmax(self, x: torch.Tensor, out_features: int) -> torch.Tensor:
        """The index of each row's largest output among the first `out_features` (no bias),
        x [M, K] -> int64 [M]: torch.argmax of `apply(x)`'s bf16 values (first of equals, a NaN
        first), without writing the outputs out (an LM head's greedy tokens)."""
        ops = get_ops()
        if ops is None or self.swiglu:
            return self.apply(x, with_bias=False)[:, :out_features].float().argmax(dim=-1)
        return ops.bf16_linear_argmax(x, self.blocks, out_features)

    def _logical_bias(self, bias: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return gate_up_order(bias, self.out_features // 2)
        return bias[:self.out_features]


#: Batch size oneDNN tunes the packed layout for (decode batches; prefill is compute-bound).
PACKING_BATCH_HINT = 64
#: ... and for the layers of modules that only ever multiply many rows (`many_rows`).
MANY_ROWS_BATCH_HINT = 1024


@dataclass(frozen=True)
class OneDnnWeight:
    """A bf16 weight in oneDNN's packed layout (CPUs without AVX-512)."""

    packed: torch.Tensor  # opaque oneDNN tensor
    bias: torch.Tensor | None
    in_features: int
    out_features: int

    @classmethod
    def pack(cls, weight: torch.Tensor, bias: torch.Tensor | None,
             batch_hint: int = PACKING_BATCH_HINT) -> OneDnnWeight:
        out_features, in_features = weight.shape
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)
        return cls(packed, None if bias is None else bias.detach(), in_features, out_features)

    def apply(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.packed,
                                               self.bias if with_bias else None, "none", [],
                                               "")
        return y.view(*x.shape[:-1], self.out_features)

    def kernel_args(self) -> None:
        return None  # an opaque oneDNN tensor: only oneDNN multiplies it


def can_pack(weight: torch.Tensor) -> bool:
    """bf16 weights on a CPU with glmv's AVX-512 product, or a torch build with oneDNN's
    packed linear kernels."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16
            and (bf16_blocks_native() or onednn_packing()))


def bf16_blocks_native() -> bool:
    """Whether glmv's kernels are built and multiply bf16 blocks on AVX-512 (vdpbf16ps where
    the CPU has AVX512-BF16, AVX512F multiply-adds elsewhere)."""
    ops = get_ops()
    return ops is not None and bool(ops.bf16_linear_native())


def onednn_packing() -> bool:
    """Whether this torch build has oneDNN's packed linear kernels."""
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def onednn_for_many_rows() -> bool:
    """Whether oneDNN's packed product beats glmv's blocks on products of many rows: on CPUs
    with AMX, where both run on tiles and oneDNN's blocking keeps them busier (2048 rows of a
    vision layer, caches cold: 1.7-1.9 TFLOP/s against 1.1-1.3, docs/engine.md)."""
    ops = get_ops()
    return onednn_packing() and ops is not None and bool(ops.linear_amx())


def pack_weight(weight: torch.Tensor, bias: torch.Tensor | None,
                many_rows: bool = False, swiglu: bool = False) -> PackedWeight:
    """`weight` (bf16 on CPU, `can_pack`) in the layout of the best product this machine has
    for its layer: `many_rows` for a layer that never multiplies decode-sized batches;
    `swiglu` for a [gate | up] projection (in SwiGLU pairs where glmv's blocks take it)."""
    pairs = swiglu and weight.shape[0] % 2 == 0 and bf16_blocks_native()
    # A [gate | up] projection keeps glmv's SwiGLU blocks even among many rows: their fused
    # activation beats oneDNN's product plus a separate silu_and_mul pass over its output
    # (the vision tower's 2048 x 512 -> 2 x 2048: 4.5 vs 4.9 ms, docs/engine.md).
    if many_rows and onednn_for_many_rows() and not pairs:
        return OneDnnWeight.pack(weight, bias, MANY_ROWS_BATCH_HINT)
    if bf16_blocks_native():
        return Bf16Blocks.pack(weight, bias, swiglu=pairs)
    return OneDnnWeight.pack(weight, bias)


def pack_linear_weights(model: nn.Module) -> int:
    """Give every bf16 `Linear` (and `KernelEqualsStride`, as its [out, in x kernel] product)
    on CPU a packed copy of its weight (glmv's bf16 blocks, or oneDNN's layout on CPUs without
    AVX-512) and use it from now on; the plain weight is then released unless another module
    shares it (tied embeddings).

    Why: the plain [out, in] weight is re-laid out by oneDNN on every call; a packed layout
    streams once, which makes decode-sized products (a few rows) 1.5-2x faster.
    The layers inside a module whose class sets `many_rows = True` (the vision tower: every
    call multiplies all patches of a step's images) get the layout of `pack_weight(...,
    many_rows=True)`. Returns the number of layers packed. Loading weights must happen before
    this.
    """
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    many_rows_prefixes = tuple(f"{name}." for name, module in model.named_modules()
                               if getattr(module, "many_rows", False))
    count = 0
    for name, module in model.named_modules():
        if not isinstance(module, (Linear, KernelEqualsStride)) or module.packed is not None:
            continue
        weight = module.weight
        if not can_pack(weight):
            continue
        module.packed = pack_weight(weight.flatten(1), module.bias,
                                    many_rows=name.startswith(many_rows_prefixes),
                                    swiglu=isinstance(module, Linear) and module.swiglu_pairs)
        if uses[id(weight)] == 1:
            weight.data = torch.empty(0, dtype=weight.dtype)
        count += 1
    return count


# -- tensor parallelism ---------------------------------------------------------------------
#
# Megatron's split: a column-parallel layer keeps a slice of the output features on each rank
# (no communication: its output stays sharded), a row-parallel layer a slice of the input
# features (its partial products are summed over the group). Attention and MLP then need one
# all-reduce each: qkv and gate_up are column-parallel, o_proj and down_proj row-parallel.
# Each layer's weight loader takes the full checkpoint tensor and keeps this rank's slice
# (lazily: narrow/split it, and copy_checked reads only the slice kept).


def narrowed(loaded: LoadedTensor, dim: int, index: int, size: int, parts: int
             ) -> LoadedTensor:
    """Piece `index` of a checkpoint tensor cut along `dim` into `parts` pieces of `size`;
    ShapeMismatch unless it is exactly that long (never a slice of a tensor of another size).
    The other dimensions are left for copy_checked."""
    if loaded.shape[dim] != size * parts:
        want = list(loaded.shape)
        want[dim] = size * parts
        raise ShapeMismatch(tuple(loaded.shape), tuple(want))
    return loaded.narrow(dim, index * size, size)


class ColumnParallelLinear(Linear):
    """Output features split over the tensor-parallel group; the output stays sharded
    (`gather_output=True` concatenates it on every rank)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 gather_output: bool = False, tp: TPGroup | None = None) -> None:
        self.tp = tp or get_tp_group()
        super().__init__(in_features, self.tp.shard(out_features, "output features"), bias)
        self.gather_output = gather_output
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self._load_rows  # type: ignore[attr-defined]

    def _load_rows(self, param: nn.Parameter, loaded: LoadedTensor, shard_id: object) -> None:
        copy_checked(param.data,
                     narrowed(loaded, 0, self.tp.rank, param.shape[0], self.tp.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.tp.all_gather(y) if self.gather_output else y


class MergedColumnParallelLinear(MergedLinear):
    """Stacked projections (gate|up) with each one's output split over the group: every rank
    holds its slice of gate followed by its slice of up.

    `prepacked`: the checkpoint stores the projections already stacked in one tensor (the
    glm4v decoder's gate_up_proj), loaded whole (shard id None) and cut here.
    """

    def __init__(self, in_features: int, shard_sizes: Sequence[tuple[object, int]],
                 bias: bool = False, prepacked: bool = False, tp: TPGroup | None = None) -> None:
        self.tp = tp or get_tp_group()
        local = [(shard_id, self.tp.shard(size, f"projection {shard_id!r}"))
                 for shard_id, size in shard_sizes]
        super().__init__(in_features, local, bias)
        if prepacked:
            self._expect_stacked()

    def _load_shard(self, param: nn.Parameter, loaded: LoadedTensor, shard_id: object) -> None:
        if shard_id is None:  # the stacked tensor: each projection in turn
            self._load_stacked(param, loaded,
                               [size * self.tp.size for _, size in self.shard_offsets.values()])
            return
        _, size = self.shard_offsets[shard_id]
        super()._load_shard(param, narrowed(loaded, 0, self.tp.rank, size, self.tp.size),
                            shard_id)


class QKVParallelLinear(MergedLinear):
    """q|k|v with the attention heads split over the group: num_heads / tp query heads per rank;
    KV heads split too, or, when there are fewer KV heads than ranks, each replicated on
    tp / num_kv_heads ranks (rank r holds KV head r * num_kv_heads // tp)."""

    def __init__(self, in_features: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TPGroup | None = None) -> None:
        self.tp = tp = tp or get_tp_group()
        self.num_heads = tp.shard(num_heads, "attention heads")
        # The checkpoint's k and v are cut into kv_parts pieces, of which this rank holds one.
        if num_kv_heads >= tp.size:
            self.num_kv_heads = tp.shard(num_kv_heads, "KV heads")
            self.kv_index, self.kv_parts = tp.rank, tp.size
        else:
            if tp.size % num_kv_heads:
                raise ConfigError(f"the tensor-parallel size ({tp.size}) is not a multiple of "
                                  f"the KV heads ({num_kv_heads}) it would replicate")
            self.num_kv_heads = 1
            self.kv_index, self.kv_parts = tp.rank * num_kv_heads // tp.size, num_kv_heads
        super().__init__(in_features, [("q", self.num_heads * head_dim),
                                       ("k", self.num_kv_heads * head_dim),
                                       ("v", self.num_kv_heads * head_dim)], bias)

    def _load_shard(self, param: nn.Parameter, loaded: LoadedTensor, shard_id: object) -> None:
        _, size = self.shard_offsets[shard_id]
        index, parts = ((self.tp.rank, self.tp.size) if shard_id == "q"
                        else (self.kv_index, self.kv_parts))
        super()._load_shard(param, narrowed(loaded, 0, index, size, parts), shard_id)


class RowParallelLinear(Linear):
    """Input features split over the group; the partial products are summed (all-reduce) and
    the bias, held whole by every rank, is added once after the sum. `input_is_parallel`: the
    input arrives already sharded (from a column-parallel layer); otherwise this rank takes its
    slice of the full input."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 input_is_parallel: bool = True, tp: TPGroup | None = None) -> None:
        self.tp = tp or get_tp_group()
        super().__init__(self.tp.shard(in_features, "input features"), out_features, bias)
        self.input_is_parallel = input_is_parallel
        self.weight.weight_loader = self._load_columns  # type: ignore[attr-defined]

    def _load_columns(self, param: nn.Parameter, loaded: LoadedTensor, shard_id: object) -> None:
        copy_checked(param.data,
                     narrowed(loaded, 1, self.tp.rank, param.shape[1], self.tp.size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel and self.tp.size > 1:
            x = x.narrow(-1, self.tp.rank * self.in_features, self.in_features)
        if self.tp.size == 1:
            return self._product(x, self.bias)
        y = self.tp.all_reduce(self._product(x, None))
        return y if self.bias is None else y + self.bias


class PackedQKVParallelLinear(QKVParallelLinear):
    """QKVParallelLinear whose checkpoint stores q|k|v stacked in one tensor (the vision
    tower's attn.qkv): loaded whole (shard id None) and cut into q, k and v here, so each rank
    keeps its heads' rows of each, as from three separate tensors."""

    def __init__(self, in_features: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TPGroup | None = None) -> None:
        super().__init__(in_features, head_dim, num_heads, num_kv_heads, bias, tp)
        self._expect_stacked()

    def _load_shard(self, param: nn.Parameter, loaded: LoadedTensor, shard_id: object) -> None:
        if shard_id is not None:  # one projection, cut by QKVParallelLinear
            super()._load_shard(param, loaded, shard_id)
            return
        parts = {"q": self.tp.size, "k": self.kv_parts, "v": self.kv_parts}
        self._load_stacked(param, loaded, [size * parts[str(sid)]
                                           for sid, (_, size) in self.shard_offsets.items()])
