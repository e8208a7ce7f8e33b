"""Checkpoint folders: resolving a path or hub id, the tensors a config implies, reading them.

`expected_tensors(cfg)` lists every tensor name and shape of the published layout (protocol
section 7.4) from config.json alone. The loader validates a checkpoint against it before reading
any data, so a wrong checkpoint fails fast with every problem named in checkpoint terms.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glmv.config import DTYPE_NAMES, ModelConfig
from glmv.errors import CheckpointError, ConfigError

# (name, shape, kind); kind: "linear", "embed", "norm", "bias", "route_bias".
TensorSpec = tuple[str, tuple[int, ...], str]
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
    """The safetensors files of a folder (one file or shards with an index), read lazily."""

    def __init__(self, model_dir: str | Path) -> None:
        self.root = Path(model_dir)
        self.files = self._find_files()
        self._handles: dict[Path, Any] = {}
        self.locations: dict[str, Path] = {}  # tensor name -> file
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in self.files:
            for name, (dtype, shape) in self._header(path).items():
                self.locations[name] = path
                self.shapes[name] = shape
                self.dtypes[name] = dtype

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
    def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Parse the safetensors header (names, dtypes, shapes) without reading tensor data."""
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                if size <= 0 or size > 100 * 1024**2 or size > path.stat().st_size - 8:
                    raise ValueError("bad header length")
                header = json.loads(f.read(size))
            out = {}
            for name, info in header.items():
                if name != "__metadata__":
                    out[name] = (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
            return out
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def get(self, name: str) -> Any:
        """One tensor (torch), read from its file."""
        from safetensors import safe_open

        path = self.locations[name]
        try:
            if path not in self._handles:
                self._handles[path] = safe_open(str(path), framework="pt")
            return self._handles[path].get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {name} from {path}: {exc}") from exc

    def names_by_file(self) -> Iterator[tuple[Path, list[str]]]:
        for path in self.files:
            yield path, [n for n, p in self.locations.items() if p == path]

    def close(self) -> None:
        self._handles.clear()
