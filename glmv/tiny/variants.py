"""The four GLM-V variants as checkpoint recipes: config.json, processor configs, special tokens.

Each recipe reproduces the *structure* of the published files (same keys, same nesting, same
special-token order and processor classes) with dimensions chosen by size:
- `tiny`: a few million parameters, for tests (seconds on a CPU);
- `bench`: a few hundred million parameters with the real 151,552-row vocabulary, for benchmarks.
Special-token ids follow the trained tokenizer, so they differ from the real checkpoints'
ids: code that hard-codes ids fails on these checkpoints, as it should.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glmv.multimodal.processor_config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

VARIANTS = ("glm-4.1v-thinking", "glm-4.6v-flash", "glm-4.5v", "glm-4.6v")
SIZES = ("tiny", "bench")
REAL_VOCAB_SIZE = 151552

# Shared GLM-4 base tokens, in id order (151329.. in the real tokenizers).
BASE_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>",
)
# GLM-4.1V-9B-Thinking additions (151343..151351), special flag as published.
GLM41V_TOKENS = (
    ("<|image|>", True), ("<|video|>", True), ("<think>", False), ("</think>", False),
    ("<answer>", False), ("</answer>", False), ("<|begin_of_box|>", False),
    ("<|end_of_box|>", False), ("<|sep|>", False),
)
# GLM-4.5 tokenizer additions (151343..151364): the ten XML tags and /nothink are not special.
GLM45_TOKENS = (
    ("<|begin_of_audio|>", True), ("<|end_of_audio|>", True), ("<|begin_of_transcription|>", True),
    ("<|end_of_transcription|>", True), ("<|code_prefix|>", True), ("<|code_middle|>", True),
    ("<|code_suffix|>", True), ("<think>", False), ("</think>", False), ("<tool_call>", False),
    ("</tool_call>", False), ("<tool_response>", False), ("</tool_response>", False),
    ("<arg_key>", False), ("</arg_key>", False), ("<arg_value>", False), ("</arg_value>", False),
    ("/nothink", False), ("<|begin_of_box|>", True), ("<|end_of_box|>", True),
    ("<|image|>", True), ("<|video|>", True),
)


@dataclass(frozen=True)
class VariantSpec:
    """What distinguishes one published GLM-V checkpoint from another."""

    name: str
    model_type: str  # glm4v | glm4v_moe
    tokenizer_layout: str  # "glm41v" | "glm45"
    chat_template: str  # file name under glmv/assets/chat_templates
    processor_class: str  # Glm4vProcessor | Glm46VProcessor
    rope_theta: float
    max_position_embeddings: int
    extra_eos: tuple[str, ...]  # stop tokens beyond <|endoftext|>, <|user|>, <|observation|>

    @property
    def is_moe(self) -> bool:
        return self.model_type == "glm4v_moe"

    @property
    def added_tokens(self) -> list[tuple[str, bool]]:
        extra = GLM41V_TOKENS if self.tokenizer_layout == "glm41v" else GLM45_TOKENS
        return [(t, True) for t in BASE_TOKENS] + list(extra)


SPECS: dict[str, VariantSpec] = {
    "glm-4.1v-thinking": VariantSpec(
        "glm-4.1v-thinking", "glm4v", "glm41v", "glm41v.jinja", "Glm4vProcessor",
        10000.0, 65536, ("</answer>",)),
    "glm-4.6v-flash": VariantSpec(
        "glm-4.6v-flash", "glm4v", "glm45", "glm46v.jinja", "Glm46VProcessor",
        500000.0, 131072, ()),
    "glm-4.5v": VariantSpec(
        "glm-4.5v", "glm4v_moe", "glm45", "glm45v.jinja", "Glm4vProcessor",
        10000.0, 65536, ()),
    "glm-4.6v": VariantSpec(
        "glm-4.6v", "glm4v_moe", "glm45", "glm46v.jinja", "Glm46VProcessor",
        500000.0, 131072, ()),
}

# Dimensions per size. Real models: text hidden 4096 / head_dim 128 / mrope [8,12,12];
# vision depth 24, hidden 1536, 12 heads.
_TEXT_DIMS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=256, num_hidden_layers=2, mrope_section=[2, 3, 3]),
    "bench": dict(hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                  intermediate_size=3072, num_hidden_layers=12, mrope_section=[8, 12, 12]),
}
_MOE_DIMS: dict[str, dict[str, Any]] = {
    # More query heads than hidden / head_dim, as in the real model (96 x 128 > 4096).
    "tiny": dict(num_hidden_layers=3, num_attention_heads=8, n_routed_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=64, n_group=2, topk_group=1),
    "bench": dict(num_hidden_layers=8, num_attention_heads=16, n_routed_experts=32,
                  num_experts_per_tok=4, moe_intermediate_size=512, n_group=1, topk_group=1),
}
_VISION_DIMS: dict[str, dict[str, Any]] = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=2, image_size=56, intermediate_size=256),
    "bench": dict(depth=6, hidden_size=512, num_heads=4, image_size=336, intermediate_size=2048),
}


def pad_vocab(num_tokens: int, size: str) -> int:
    """Embedding rows: the real vocabulary for bench, else rounded up like the real padding."""
    if size == "bench":
        return max(REAL_VOCAB_SIZE, num_tokens)
    return -(-num_tokens // 64) * 64


def _text_config(spec: VariantSpec, size: str, token_ids: dict[str, int],
                 vocab_size: int) -> dict[str, Any]:
    dims = dict(_TEXT_DIMS[size])
    section = dims.pop("mrope_section")
    head_dim = dims.pop("head_dim")
    eos = [token_ids[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>", *spec.extra_eos)]
    text: dict[str, Any] = {
        "model_type": f"{spec.model_type}_text",
        "vocab_size": vocab_size,
        **dims,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "use_cache": True,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "rope_theta": spec.rope_theta,
        "partial_rotary_factor": 0.5,
        "rope_scaling": {"type": "default", "mrope_section": section},
        "pad_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": eos,
        "image_token_id": token_ids["<|image|>"],
        "video_token_id": token_ids["<|video|>"],
        "dtype": "bfloat16",
    }
    if spec.is_moe:
        text["head_dim"] = head_dim
        text.update(_MOE_DIMS[size])
        text.update({"n_shared_experts": 1, "first_k_dense_replace": 1, "norm_topk_prob": True,
                     "routed_scaling_factor": 1.0, "use_qk_norm": False,
                     "num_nextn_predict_layers": 0})
    else:
        # glm4v derives head_dim from hidden_size / num_attention_heads.
        text["num_attention_heads"] = dims["hidden_size"] // head_dim
    return text


def _vision_config(spec: VariantSpec, size: str, out_hidden_size: int) -> dict[str, Any]:
    return {
        "model_type": f"{spec.model_type}_vision",
        **_VISION_DIMS[size],
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "in_channels": 3,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": out_hidden_size,
        "rms_norm_eps": 1e-05,
        "initializer_range": 0.02,
    }


def build_config(spec: VariantSpec, size: str, token_ids: dict[str, int],
                 vocab_size: int) -> dict[str, Any]:
    """config.json in the published layout: ids at the top, nested text and vision configs."""
    text = _text_config(spec, size, token_ids, vocab_size)
    return {
        "architectures": [
            "Glm4vMoeForConditionalGeneration" if spec.is_moe else "Glm4vForConditionalGeneration"
        ],
        "model_type": spec.model_type,
        "image_start_token_id": token_ids["<|begin_of_image|>"],
        "image_end_token_id": token_ids["<|end_of_image|>"],
        "video_start_token_id": token_ids["<|begin_of_video|>"],
        "video_end_token_id": token_ids["<|end_of_video|>"],
        "image_token_id": token_ids["<|image|>"],
        "video_token_id": token_ids["<|video|>"],
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "transformers_version": "4.57.1",
        "text_config": text,
        "vision_config": _vision_config(spec, size, text["hidden_size"]),
    }


def processor_configs(spec: VariantSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """preprocessor_config.json and video_preprocessor_config.json as published."""
    is_46 = spec.processor_class == "Glm46VProcessor"
    common = {
        "do_rescale": True,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
        "processor_class": spec.processor_class,
    }
    image = {"size": {"shortest_edge": 12544, "longest_edge": 9633792}, **common,
             "image_processor_type": "Glm46VImageProcessor" if is_46 else "Glm4vImageProcessor"}
    video = {"size": {"shortest_edge": 12544, "longest_edge": 47040000}, **common,
             "video_processor_type": "Glm46VVideoProcessor" if is_46 else "Glm4vVideoProcessor"}
    return image, video
