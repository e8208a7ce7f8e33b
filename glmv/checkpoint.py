"""Checkpoint folders: resolving a path or hub id, the tensors a config implies, reading them.

`expected_tensors(cfg)` lists every tensor name and shape of the published layout (protocol
section 7.4) from config.json alone. The loader validates a checkpoint against it before reading
any data, so a wrong checkpoint fails fast with every problem named in checkpoint terms.

Tensors are handed to the weight loaders as `LazyTensor`s: each rank of a tensor-parallel group
narrows them to its own slice, and only that slice's bytes are read from the file.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from glmv.config import DTYPE_NAMES, ModelConfig
from glmv.errors import CheckpointError, ConfigError

if TYPE_CHECKING:  # torch is imported only where tensors are made (resolving a path needs none)
    import torch

# (name, shape, kind); kind: "linear", "embed", "norm", "bias", "route_bias".
TensorSpec = tuple[str, tuple[int, ...], str]
# [start, stop) along each dimension of a stored tensor.
Region = tuple[tuple[int, int], ...]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.md"]


def torch_dtype(name: str) -> Any:
    """The torch dtype named `name` (one of DTYPE_NAMES); ConfigError for anything else."""
    if name not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)}")
    import torch

    return getattr(torch, name)


def resolve_model_path(model: str | os.PathLike[str], allow_download: bool | None = None) -> Path:
    """A local folder as is; a hub id ("org/name") through the local Hugging Face cache.

    Downloads only when `allow_download` is true, or when it is None and HF_HUB_OFFLINE is not
    set. Anything else raises CheckpointError saying what was tried.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    text = str(model)
    if path.exists():
        raise CheckpointError(f"{text!r} is a file, not a model folder (the folder holding "
                              "config.json and the *.safetensors)")
    if not _HUB_ID.match(text):
        raise CheckpointError(f"model folder {text!r} does not exist")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True, allow_patterns=_WEIGHT_PATTERNS))
    except LocalEntryNotFoundError:
        pass
    if allow_download is False or (allow_download is None and _hub_offline()):
        raise CheckpointError(f"{text!r} is neither a local folder nor in the local Hugging "
                              f"Face cache ({constants.HF_HUB_CACHE}), and downloads are off "
                              "(HF_HUB_OFFLINE or allow_download=False)")
    try:
        return Path(snapshot_download(text, allow_patterns=_WEIGHT_PATTERNS))
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise CheckpointError(f"could not download {text!r}: {exc}") from exc


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE read the way huggingface_hub reads it ("0" and "false" mean online)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _linear(name: str, out_dim: int, in_dim: int, bias: bool = False) -> Iterator[TensorSpec]:
    yield f"{name}.weight", (out_dim, in_dim), "linear"
    if bias:
        yield f"{name}.bias", (out_dim,), "bias"


def _mlp(name: str, hidden: int, inter: int) -> Iterator[TensorSpec]:
    yield from _linear(f"{name}.gate_proj", inter, hidden)
    yield from _linear(f"{name}.up_proj", inter, hidden)
    yield from _linear(f"{name}.down_proj", hidden, inter)


def vision_tensors(cfg: ModelConfig) -> Iterator[TensorSpec]:
    v = cfg.vision
    p = "model.visual"
    hid, out, m = v.hidden_size, v.out_hidden_size, v.spatial_merge_size
    kernel = (hid, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    yield f"{p}.patch_embed.proj.weight", kernel, "linear"
    yield f"{p}.patch_embed.proj.bias", (hid,), "bias"
    yield f"{p}.post_conv_layernorm.weight", (hid,), "norm"
    num_positions = (v.image_size // v.patch_size) ** 2
    yield f"{p}.embeddings.position_embedding.weight", (num_positions, hid), "embed"
    for i in range(v.depth):
        b = f"{p}.blocks.{i}"
        yield f"{b}.norm1.weight", (hid,), "norm"
        yield f"{b}.norm2.weight", (hid,), "norm"
        yield from _linear(f"{b}.attn.qkv", 3 * hid, hid, v.attention_bias)
        yield from _linear(f"{b}.attn.proj", hid, hid)
        yield from _mlp(f"{b}.mlp", hid, out)
    yield f"{p}.post_layernorm.weight", (hid,), "norm"
    yield f"{p}.downsample.weight", (out, hid, m, m), "linear"
    yield f"{p}.downsample.bias", (out,), "bias"
    yield from _linear(f"{p}.merger.proj", out, out)
    yield f"{p}.merger.post_projection_norm.weight", (out,), "norm"
    yield f"{p}.merger.post_projection_norm.bias", (out,), "bias"
    yield from _mlp(f"{p}.merger", out, v.intermediate_size)


def _text_layer(cfg: ModelConfig, i: int) -> Iterator[TensorSpec]:
    t = cfg.text
    h = t.hidden_size
    layer = f"model.language_model.layers.{i}"
    yield f"{layer}.input_layernorm.weight", (h,), "norm"
    yield f"{layer}.post_attention_layernorm.weight", (h,), "norm"
    if t.sandwich_norm:
        yield f"{layer}.post_self_attn_layernorm.weight", (h,), "norm"
        yield f"{layer}.post_mlp_layernorm.weight", (h,), "norm"
    a = f"{layer}.self_attn"
    yield from _linear(f"{a}.q_proj", t.q_size, h, t.attention_bias)
    yield from _linear(f"{a}.k_proj", t.kv_size, h, t.attention_bias)
    yield from _linear(f"{a}.v_proj", t.kv_size, h, t.attention_bias)
    yield from _linear(f"{a}.o_proj", h, t.q_size)
    moe = t.moe
    if moe is None:
        yield from _linear(f"{layer}.mlp.gate_up_proj", 2 * t.intermediate_size, h)
        yield from _linear(f"{layer}.mlp.down_proj", h, t.intermediate_size)
    elif i < moe.first_k_dense_replace:
        yield from _mlp(f"{layer}.mlp", h, t.intermediate_size)
    else:
        yield f"{layer}.mlp.gate.weight", (moe.n_routed_experts, h), "linear"
        yield f"{layer}.mlp.gate.e_score_correction_bias", (moe.n_routed_experts,), "route_bias"
        for e in range(moe.n_routed_experts):
            yield from _mlp(f"{layer}.mlp.experts.{e}", h, moe.moe_intermediate_size)
        yield from _mlp(f"{layer}.mlp.shared_experts", h,
                        moe.moe_intermediate_size * moe.n_shared_experts)


def text_tensors(cfg: ModelConfig) -> Iterator[TensorSpec]:
    t = cfg.text
    yield "model.language_model.embed_tokens.weight", (t.vocab_size, t.hidden_size), "embed"
    for i in range(t.num_hidden_layers):
        yield from _text_layer(cfg, i)
    yield "model.language_model.norm.weight", (t.hidden_size,), "norm"
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (t.vocab_size, t.hidden_size), "linear"


def expected_tensors(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the published layout for this config, in a stable order."""
    return [*vision_tensors(cfg), *text_tensors(cfg)]


class CheckpointReader:
    """The safetensors files of a folder (one file or shards with an index), read lazily:
    constructing it parses the headers only; `get` reads a tensor, or a region of one."""

    def __init__(self, model_dir: str | Path) -> None:
        self.root = Path(model_dir)
        self.files = self._find_files()
        self._handles: dict[Path, Any] = {}
        self.locations: dict[str, Path] = {}  # tensor name -> file
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.nbytes: dict[str, int] = {}  # stored size of each tensor
        self.bytes_read: Counter[str] = Counter()  # tensor name -> bytes `get` has read of it
        for path in self.files:
            for name, (dtype, shape, nbytes) in self._header(path).items():
                self.locations[name] = path
                self.shapes[name] = shape
                self.dtypes[name] = dtype
                self.nbytes[name] = nbytes

    def _find_files(self) -> list[Path]:
        index = self.root / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from exc
            files = sorted({self.root / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are missing: {missing}")
            return files
        files = sorted(self.root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors weights in {self.root}")
        return files

    @staticmethod
    def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...], int]]:
        """Parse the safetensors header (names, dtypes, shapes, sizes) without reading tensor
        data."""
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if size <= 0 or size > 100 * 1024**2 or size > path.stat().st_size - 8:
                    raise ValueError("bad header length")
                header = json.loads(f.read(size))
            out = {}
            for name, info in header.items():
                if name != "__metadata__":
                    begin, end = (int(o) for o in info["data_offsets"])
                    out[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]),
                                 end - begin)
            return out
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def get(self, name: str, region: Region | None = None) -> torch.Tensor:
        """One tensor read from its file: whole, or only `region` of it (only those bytes are
        read). Adds what it read to `bytes_read`."""
        from safetensors import safe_open

        path = self.locations[name]
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt")
            handle = self._handles[path]
            if region is None or region == self.whole(name):
                tensor = handle.get_tensor(name)
            else:
                tensor = handle.get_slice(name)[tuple(slice(a, b) for a, b in region)]
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {name} from {path}: {exc}") from exc
        self.bytes_read[name] += tensor.numel() * tensor.element_size()
        return tensor

    def whole(self, name: str) -> Region:
        """The region that is all of tensor `name`."""
        return tuple((0, size) for size in self.shapes[name])

    def lazy(self, name: str, fp8: Fp8Blocks | None = None) -> LazyTensor:
        """Tensor `name`, not read yet (FP8 weights: dequantized when read)."""
        return LazyTensor(self, name, self.whole(name), fp8)

    def names_by_file(self) -> Iterator[tuple[Path, list[str]]]:
        for path in self.files:
            yield path, [n for n, p in self.locations.items() if p == path]

    def close(self) -> None:
        self._handles.clear()


@dataclass(frozen=True)
class Fp8Blocks:
    """How an FP8 weight dequantizes: its weight_scale_inv tensor holds one scale per block."""

    scale_name: str
    block: tuple[int, int]  # rows, columns


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """weight [rows, cols] fp8 * its blocks' scale_inv -> float32.

    `weight` may be a region of a larger weight; `scale_inv` then holds the scales of the
    blocks the region touches, and `offset` (row, col) is where the region starts within the
    first of them:

        +--------+--------+--------+
        | offset |        |        |    scale_inv [2, 3]: value (i, j) of the region is
        |   +----+--------+----+   |    scaled by block ((row + i) // block[0],
        +---+----+--------+----+---+                     (col + j) // block[1])
        |   |     region       |   |
        |   +------------------+   |
        +--------+--------+--------+
    """
    rows, cols = weight.shape
    row0, col0 = offset
    scale = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return weight.float() * scale[row0:row0 + rows, col0:col0 + cols]


@dataclass(frozen=True)
class LazyTensor:
    """A region of one checkpoint tensor, read only when `materialize()` is called.

    Weight loaders cut it as they would a torch.Tensor (`shape`, `narrow`, `split`) and
    `copy_checked` materializes what it copies, so a tensor-parallel rank reads only its own
    slice of a split tensor, and nothing of a tensor it skips (another rank's experts). FP8
    weights are read with the scales of the blocks their region touches and come out
    dequantized (float32), bit for bit the same slice a whole read would give.
    """

    reader: CheckpointReader
    name: str
    region: Region  # of the stored tensor
    fp8: Fp8Blocks | None = None

    @property
    def shape(self) -> torch.Size:
        import torch

        return torch.Size(stop - start for start, stop in self.region)

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor:
        """As torch.Tensor.narrow: entries start..start + length of dimension `dim`."""
        if not -len(self.region) <= dim < len(self.region):
            raise IndexError(f"dimension {dim} is out of range for {self.name}")
        dim %= len(self.region)
        begin, stop = self.region[dim]
        if start < 0 or length < 0 or begin + start + length > stop:
            raise IndexError(f"narrow({dim}, {start}, {length}) is outside {list(self.shape)} "
                             f"of {self.name}")
        region = list(self.region)
        region[dim] = (begin + start, begin + start + length)
        return replace(self, region=tuple(region))

    def split(self, sizes: Sequence[int], dim: int = 0) -> list[LazyTensor]:
        """As torch.Tensor.split with a list of sizes: consecutive pieces along `dim`."""
        if sum(sizes) != self.shape[dim]:
            raise ValueError(f"split sizes {list(sizes)} do not add up to dimension {dim} of "
                             f"{list(self.shape)} ({self.name})")
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [self.narrow(dim, start, size) for start, size in zip(starts, sizes, strict=True)]

    def materialize(self) -> torch.Tensor:
        """The region's data, read from the file (FP8: dequantized)."""
        data = self.reader.get(self.name, self.region)
        if self.fp8 is None:
            return data
        (row0, row1), (col0, col1) = self.region
        rows, cols = self.fp8.block
        touched = ((row0 // rows, -(-row1 // rows)), (col0 // cols, -(-col1 // cols)))
        scale_inv = self.reader.get(self.fp8.scale_name, touched)
        return dequantize_fp8(data, scale_inv, self.fp8.block, (row0 % rows, col0 % cols))


#: What a weight loader is handed: a tensor, or a checkpoint tensor read only where copied.
LoadedTensor: TypeAlias = "torch.Tensor | LazyTensor"
