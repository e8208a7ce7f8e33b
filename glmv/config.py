"""Frozen, validated configuration read from a checkpoint's config.json.

`ModelConfig.from_pretrained(dir)` accepts both layouts found in the wild: the nested one
(`text_config` / `vision_config`, what transformers 5.x writes) and the legacy flat one (text keys
at the top level), and both rope spellings (`rope_parameters` vs `rope_theta` +
`partial_rotary_factor` + `rope_scaling.mrope_section`). Token ids always come from the file.
No torch import here: dtypes are names.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmv.errors import ConfigError, GlmvError, UnsupportedModelError

#: model_type -> (architecture, text rope style). The two decoders of the family.
SUPPORTED_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "glm4v": ("Glm4vForConditionalGeneration", "interleaved"),
    "glm4v_moe": ("Glm4vMoeForConditionalGeneration", "neox"),
}
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def read_json_object(path: Path, error: type[GlmvError], what: str) -> dict[str, Any]:
    """A JSON object from `path`; every failure raises `error` naming `what` and the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise error(f"{what} {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _require(d: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise ConfigError(f"{where} is missing the key {key!r}")
    return d[key]


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class VisionConfig:
    """The ViT shared by all GLM-V models (`vision_config`)."""

    depth: int  # number of transformer blocks
    hidden_size: int  # ViT width
    num_heads: int
    patch_size: int  # spatial patch edge in pixels (14)
    temporal_patch_size: int  # frames per temporal patch (2)
    spatial_merge_size: int  # patches merged per side into one LLM token (2)
    in_channels: int
    image_size: int  # the learned position table covers (image_size / patch_size)^2 patches
    out_hidden_size: int  # merger width = LLM hidden size
    intermediate_size: int  # merger SwiGLU width (not the ViT MLP, which uses out_hidden_size)
    hidden_act: str
    rms_norm_eps: float
    attention_bias: bool
    rope_theta: float  # 2-D rotary base inside the ViT

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x temporal x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "temporal_patch_size",
                     "spatial_merge_size", "in_channels", "image_size", "out_hidden_size",
                     "intermediate_size"):
            _positive_int(getattr(self, name), f"vision_config.{name}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("vision_config.hidden_size must be divisible by num_heads")
        if (self.head_dim // 2) % 2:
            raise ConfigError("vision head_dim must be a multiple of 4 for the 2-D rotary")
        side = self.image_size // self.patch_size
        if side * side * self.patch_size**2 != self.image_size**2:
            raise ConfigError("vision_config.image_size must be a multiple of patch_size")
        if self.hidden_act != "silu":
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported (silu)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VisionConfig:
        rope = d.get("rope_parameters") or {}
        return cls(
            depth=d.get("depth", d.get("num_hidden_layers", 24)),
            hidden_size=d.get("hidden_size", 1536),
            num_heads=d.get("num_heads", d.get("num_attention_heads", 12)),
            patch_size=d.get("patch_size", 14),
            temporal_patch_size=d.get("temporal_patch_size", 2),
            spatial_merge_size=d.get("spatial_merge_size", 2),
            in_channels=d.get("in_channels", 3),
            image_size=d.get("image_size", 336),
            out_hidden_size=d.get("out_hidden_size", 4096),
            intermediate_size=d.get("intermediate_size", 13696),
            hidden_act=d.get("hidden_act", "silu"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            attention_bias=bool(d.get("attention_bias", False)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
        )


@dataclass(frozen=True)
class MoEConfig:
    """Routed + shared experts of the GLM-4.5-Air style decoder (`glm4v_moe`)."""

    n_routed_experts: int
    num_experts_per_tok: int  # top-k
    moe_intermediate_size: int  # width of one expert
    n_shared_experts: int  # shared expert width = n_shared_experts * moe_intermediate_size
    first_k_dense_replace: int  # layers [0, k) use a dense MLP
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float

    def __post_init__(self) -> None:
        _positive_int(self.n_routed_experts, "n_routed_experts")
        _positive_int(self.num_experts_per_tok, "num_experts_per_tok")
        _positive_int(self.n_group, "n_group")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError("num_experts_per_tok cannot exceed n_routed_experts")
        if self.n_routed_experts % self.n_group:
            raise ConfigError("n_routed_experts must be divisible by n_group")
        if not 1 <= self.topk_group <= self.n_group:
            raise ConfigError("topk_group must be in [1, n_group]")


@dataclass(frozen=True)
class TextConfig:
    """The GLM-4 decoder (`text_config`), dense or MoE."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (MoE: the leading dense layers)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    attention_bias: bool  # bias on q/k/v projections
    max_position_embeddings: int
    rope_theta: float
    partial_rotary_factor: float  # fraction of head_dim that rotates
    mrope_section: tuple[int, int, int]  # frequencies driven by the t, h, w positions
    rope_style: str  # "interleaved" (GPT-J pairs, glm4v) or "neox" (half split, glm4v_moe)
    sandwich_norm: bool  # glm4v: extra norms after attention and after the MLP
    moe: MoEConfig | None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            _positive_int(getattr(self, name), f"text_config.{name}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be divisible by num_key_value_heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"text hidden_act {self.hidden_act!r} is not supported (silu)")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(f"rotary dim {self.rotary_dim} must be even and <= head_dim")
        if 2 * sum(self.mrope_section) != self.rotary_dim:
            raise ConfigError(
                f"mrope_section {list(self.mrope_section)} covers {2 * sum(self.mrope_section)} "
                f"rotary dims but head_dim x partial_rotary_factor = {self.rotary_dim}"
            )
        if self.rope_style not in ("interleaved", "neox"):
            raise ConfigError(f"unknown rope style {self.rope_style!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], model_type: str) -> TextConfig:
        where = "text_config"
        rope = _read_rope(d, model_type)
        hidden = _positive_int(_require(d, "hidden_size", where), "hidden_size")
        heads = _positive_int(_require(d, "num_attention_heads", where), "num_attention_heads")
        is_moe = model_type == "glm4v_moe"
        # transformers' glm4v attention ignores a head_dim key; glm4v_moe honours it.
        head_dim = int(d.get("head_dim") or hidden // heads) if is_moe else hidden // heads
        moe = None
        if is_moe:
            if d.get("use_qk_norm"):
                raise UnsupportedModelError("use_qk_norm=true is not part of GLM-V (GLM-4.5-Air)")
            moe = MoEConfig(
                n_routed_experts=d.get("n_routed_experts", 128),
                num_experts_per_tok=d.get("num_experts_per_tok", 8),
                moe_intermediate_size=d.get("moe_intermediate_size", 1408),
                n_shared_experts=d.get("n_shared_experts", 1),
                first_k_dense_replace=d.get("first_k_dense_replace", 1),
                n_group=d.get("n_group", 1),
                topk_group=d.get("topk_group", 1),
                norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)),
            )
        return cls(
            vocab_size=_require(d, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_require(d, "intermediate_size", where),
            num_hidden_layers=_require(d, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            hidden_act=d.get("hidden_act", "silu"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            attention_bias=bool(d.get("attention_bias", True)),
            max_position_embeddings=d.get("max_position_embeddings", 65536 if is_moe else 32768),
            rope_theta=rope["rope_theta"],
            partial_rotary_factor=rope["partial_rotary_factor"],
            mrope_section=rope["mrope_section"],
            rope_style=SUPPORTED_MODEL_TYPES[model_type][1],
            sandwich_norm=not is_moe,
            moe=moe,
        )


def _read_rope(d: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """Merge the 5.x `rope_parameters` and the legacy keys, with transformers' defaults.

    When `partial_rotary_factor` is absent transformers uses 1.0 for glm4v and 0.5 for
    glm4v_moe (a backward-compatibility default); we do the same so tiny configs agree.
    """
    params: dict[str, Any] = dict(d.get("rope_scaling") or {})
    params.update(d.get("rope_parameters") or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise UnsupportedModelError(f"text rope type {rope_type!r} is not supported (default)")
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    default_partial = 0.5 if model_type == "glm4v_moe" else 1.0
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor", default_partial))
    section = params.get("mrope_section", [8, 12, 12])
    if len(section) != 3 or not all(isinstance(s, int) and s > 0 for s in section):
        raise ConfigError(f"mrope_section must be three positive integers, got {section!r}")
    if not math.isfinite(float(theta)) or float(theta) <= 0:
        raise ConfigError(f"rope_theta must be positive, got {theta!r}")
    return {"rope_theta": float(theta), "partial_rotary_factor": float(partial),
            "mrope_section": tuple(section)}


@dataclass(frozen=True)
class QuantizationConfig:
    """Block-wise FP8 weights as published for GLM-4.5V-FP8 / GLM-4.6V-FP8."""

    method: str  # "fp8"
    weight_block_size: tuple[int, int]  # (rows, cols) covered by one scale
    activation_scheme: str  # "dynamic" in the published checkpoints
    modules_to_not_convert: tuple[str, ...]  # module name prefixes/patterns kept unquantized

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantizationConfig:
        method = d.get("quant_method")
        if method != "fp8":
            raise UnsupportedModelError(
                f"quantization method {method!r} is not supported (block-wise fp8 is)"
            )
        block = d.get("weight_block_size")
        if not (isinstance(block, (list, tuple)) and len(block) == 2):
            raise ConfigError("fp8 quantization_config needs weight_block_size [rows, cols]")
        return cls(
            method="fp8",
            weight_block_size=(_positive_int(block[0], "weight_block_size[0]"),
                               _positive_int(block[1], "weight_block_size[1]")),
            activation_scheme=d.get("activation_scheme", "dynamic"),
            modules_to_not_convert=tuple(d.get("modules_to_not_convert") or ()),
        )


@dataclass(frozen=True)
class ModelConfig:
    """Everything about one checkpoint that the model, processor and engine need."""

    model_type: str  # "glm4v" (dense) or "glm4v_moe"
    architecture: str  # e.g. "Glm4vForConditionalGeneration"
    text: TextConfig
    vision: VisionConfig
    image_token_id: int  # <|image|>: every visual embedding position (video frames too)
    video_token_id: int  # <|video|>: only in un-expanded text
    image_start_token_id: int  # <|begin_of_image|>
    image_end_token_id: int  # <|end_of_image|>
    video_start_token_id: int  # <|begin_of_video|>
    video_end_token_id: int  # <|end_of_video|>
    eos_token_ids: tuple[int, ...]  # the model's own stop ids
    pad_token_id: int | None
    tie_word_embeddings: bool
    dtype: str  # dtype the checkpoint was saved in ("bfloat16", ...)
    quantization: QuantizationConfig | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path} not found: is {model_dir} a GLM-V checkpoint folder?")
        return cls.from_dict(read_json_object(path, ConfigError, "model config"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        model_type = data.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            known = ", ".join(sorted(SUPPORTED_MODEL_TYPES))
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not a GLM-V model glmv can run (known: {known})"
            )
        architecture = SUPPORTED_MODEL_TYPES[model_type][0]
        declared = data.get("architectures") or [architecture]
        if declared[0] != architecture:
            raise UnsupportedModelError(
                f"architecture {declared[0]!r} does not match model_type {model_type!r} "
                f"(expected {architecture})"
            )
        # Text keys: legacy files keep them at the top level, nested text_config wins.
        # Token ids: published at the top level (text_config may repeat them), top level wins.
        text_dict = {k: v for k, v in data.items() if k not in ("text_config", "vision_config")}
        text_dict.update(data.get("text_config") or {})
        if "vision_config" not in data:
            raise ConfigError("config.json has no vision_config")
        eos = text_dict.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        quant = text_dict.get("quantization_config")
        ids = {key: data.get(key, text_dict.get(key)) for key in (
            "image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
            "video_start_token_id", "video_end_token_id")}
        for key, value in ids.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config.json must give {key} as an integer, got {value!r}")
        text = TextConfig.from_dict(text_dict, model_type)
        vision = VisionConfig.from_dict(data["vision_config"])
        if vision.out_hidden_size != text.hidden_size:
            raise ConfigError(
                f"vision out_hidden_size {vision.out_hidden_size} != text hidden_size "
                f"{text.hidden_size}"
            )
        dtype = str(text_dict.get("dtype") or text_dict.get("torch_dtype") or "bfloat16")
        return cls(
            model_type=model_type,
            architecture=architecture,
            text=text,
            vision=vision,
            eos_token_ids=eos_ids,
            pad_token_id=text_dict.get("pad_token_id"),
            # transformers: the root flag, or text_config's (older saves put it there).
            tie_word_embeddings=bool(
                data.get("tie_word_embeddings") or text_dict.get("tie_word_embeddings")
            ),
            dtype=dtype if dtype in DTYPE_NAMES else "bfloat16",
            quantization=QuantizationConfig.from_dict(quant) if quant else None,
            **ids,
        )
