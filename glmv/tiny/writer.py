"""`glmv make-tiny`: write a complete random-weight checkpoint folder for one GLM-V variant.

Layout (as published): config.json, generation_config.json, model.safetensors (or
model-0000i-of-0000n.safetensors + model.safetensors.index.json), tokenizer.json,
tokenizer_config.json, chat_template.jinja, preprocessor_config.json,
video_preprocessor_config.json, plus README.md saying the weights are random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from glmv.checkpoint import torch_dtype
from glmv.config import DTYPE_NAMES, ModelConfig
from glmv.errors import CheckpointError, GlmvError
from glmv.tiny.tokenizer_builder import token_ids, train_tokenizer, write_tokenizer
from glmv.tiny.variants import SIZES, SPECS, build_config, pad_vocab, processor_configs
from glmv.tiny.weights import (
    fp8_modules_not_converted,
    fp8_quantizable,
    quantize_fp8_blockwise,
    random_state_dict,
)

#: Bump when the files written change, so cached demo checkpoints are rebuilt.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class TinyCheckpointSpec:
    """What to write: variant, size, seed and storage options."""

    variant: str
    size: str = "tiny"
    seed: int = 0
    dtype: str = "bfloat16"  # storage dtype of the weights (published: bfloat16)
    fp8: bool = False  # write the block-wise FP8 form (GLM-4.5V-FP8 style)
    max_shard_bytes: int = 2 * 1024**3  # shard above this size, with an index file

    def __post_init__(self) -> None:
        if self.variant not in SPECS:
            raise GlmvError(f"unknown variant {self.variant!r}; choose from {', '.join(SPECS)}")
        if self.size not in SIZES:
            raise GlmvError(f"unknown size {self.size!r}; choose from {', '.join(SIZES)}")
        if self.dtype not in DTYPE_NAMES:
            raise GlmvError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPE_NAMES)}")
        if self.max_shard_bytes <= 0:
            raise GlmvError("max_shard_bytes must be positive")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def chat_template_text(name: str) -> str:
    return (resources.files("glmv") / "assets" / "chat_templates" / name).read_text("utf-8")


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_weights(out: Path, state: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    """Save as one file or as shards plus model.safetensors.index.json; returns file names."""
    shards = _shards(state, max_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    _write_json(out / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def to_fp8(state: dict[str, torch.Tensor], block: tuple[int, int]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if fp8_quantizable(name, tensor):
            q, scale_inv = quantize_fp8_blockwise(tensor, block)
            out[name] = q
            out[name[: -len("weight")] + "weight_scale_inv"] = scale_inv
        else:
            out[name] = tensor
    return out


def _readme(spec: TinyCheckpointSpec, num_params: int) -> str:
    return (
        f"# RANDOM WEIGHTS: {spec.variant} ({spec.size})\n\n"
        "This folder was written by `glmv make-tiny`. It has the file layout, config keys, "
        "tokenizer special tokens, chat template and processor configs of the published "
        f"{spec.variant} checkpoint, but its {num_params:,} weights are random (seed {spec.seed}) "
        "and its tokenizer was trained on a small generated corpus. Its output is meaningless; "
        "it exists for tests, benchmarks and demos.\n"
    )


def write_checkpoint(out: str | Path, spec: TinyCheckpointSpec) -> Path:
    """Write the checkpoint folder and return its path (created if needed).

    Raises CheckpointError when the folder cannot be written (a file in the way, no
    permission, disk full).
    """
    try:
        return _write(Path(out), spec)
    except OSError as exc:
        raise CheckpointError(f"cannot write the checkpoint to {str(out)!r}: {exc}") from exc


def _write(path: Path, spec: TinyCheckpointSpec) -> Path:
    variant = SPECS[spec.variant]
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(variant, spec.size, spec.seed)
    ids = token_ids(tok, variant)
    config = build_config(variant, spec.size, ids, pad_vocab(tok.get_vocab_size(), spec.size))
    config["dtype"] = config["text_config"]["dtype"] = spec.dtype
    model_cfg = ModelConfig.from_dict(config)
    state = random_state_dict(model_cfg, spec.seed, torch_dtype(spec.dtype))
    num_params = sum(t.numel() for t in state.values())
    if spec.fp8:
        block = (128, 128) if spec.size == "bench" else (32, 48)
        config["quantization_config"] = {
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": list(block),
            "modules_to_not_convert": fp8_modules_not_converted(list(state)),
        }
        state = to_fp8(state, block)
    _write_json(path / "config.json", config)
    eos = config["text_config"]["eos_token_id"]
    _write_json(path / "generation_config.json", {
        "_from_model_config": True, "eos_token_id": eos,
        "pad_token_id": config["text_config"]["pad_token_id"],
        "transformers_version": config["transformers_version"],
    })
    write_tokenizer(path, tok, variant, variant.max_position_embeddings)
    (path / "chat_template.jinja").write_text(chat_template_text(variant.chat_template), "utf-8")
    image_cfg, video_cfg = processor_configs(variant)
    _write_json(path / "preprocessor_config.json", image_cfg)
    _write_json(path / "video_preprocessor_config.json", video_cfg)
    save_weights(path, state, spec.max_shard_bytes)
    (path / "README.md").write_text(_readme(spec, num_params), "utf-8")
    return path
