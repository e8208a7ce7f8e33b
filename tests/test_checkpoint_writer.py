"""Tiny checkpoint writer: deterministic, loadable by transformers, correct sharded/FP8 forms."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from glmv.checkpoint import expected_tensors
from glmv.config import ModelConfig
from glmv.errors import GlmvError
from glmv.tiny.variants import REAL_VOCAB_SIZE, SPECS, build_config, pad_vocab
from glmv.tiny.writer import TinyCheckpointSpec, write_checkpoint
from tests.conftest import VARIANTS

PUBLISHED_FILES = {
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json",
    "README.md",
}
PROCESSOR_CLASS = {
    "glm-4.1v-thinking": "Glm4vProcessor", "glm-4.5v": "Glm4vProcessor",
    "glm-4.6v": "Glm46VProcessor", "glm-4.6v-flash": "Glm46VProcessor",
}
ARCHITECTURE = {
    "glm-4.1v-thinking": "Glm4vForConditionalGeneration",
    "glm-4.6v-flash": "Glm4vForConditionalGeneration",
    "glm-4.5v": "Glm4vMoeForConditionalGeneration",
    "glm-4.6v": "Glm4vMoeForConditionalGeneration",
}
SHARD_BYTES = 300_000  # the tiny checkpoints are 2-3 MB: several shards


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        shard = load_file(str(path))
        assert not set(shard) & set(state), "a tensor is stored twice"
        state.update(shard)
    return state


def _load_hf(folder: Path) -> tuple[Any, dict[str, Any]]:
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    return transformers.AutoModelForImageTextToText.from_pretrained(
        folder, output_loading_info=True)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("variant", VARIANTS)
def test_same_spec_is_byte_identical(variant: str, tiny_checkpoint: Any, tmp_path: Path) -> None:
    first = tiny_checkpoint(variant)
    second = write_checkpoint(tmp_path / "again", TinyCheckpointSpec(variant))
    assert PUBLISHED_FILES | {"model.safetensors"} == set(_hashes(first))
    assert _hashes(first) == _hashes(second)


def test_fp8_and_sharded_forms_are_deterministic(tiny_checkpoint: Any, tmp_path: Path) -> None:
    fp8 = tiny_checkpoint("glm-4.5v", fp8=True)
    again = write_checkpoint(tmp_path / "fp8", TinyCheckpointSpec("glm-4.5v", fp8=True))
    assert _hashes(fp8) == _hashes(again)
    sharded = tiny_checkpoint("glm-4.6v-flash", max_shard_bytes=SHARD_BYTES)
    again = write_checkpoint(tmp_path / "sharded",
                             TinyCheckpointSpec("glm-4.6v-flash", max_shard_bytes=SHARD_BYTES))
    assert _hashes(sharded) == _hashes(again)


def test_different_seed_changes_weights_and_tokenizer(tiny_checkpoint: Any) -> None:
    seed0, seed1 = tiny_checkpoint("glm-4.6v-flash"), tiny_checkpoint("glm-4.6v-flash", seed=1)
    h0, h1 = _hashes(seed0), _hashes(seed1)
    assert h0["tokenizer.json"] != h1["tokenizer.json"]
    assert h0["model.safetensors"] != h1["model.safetensors"]
    w0, w1 = _weights(seed0), _weights(seed1)
    for name in ("model.language_model.layers.0.self_attn.q_proj.weight",
                 "model.visual.blocks.0.attn.qkv.weight", "lm_head.weight"):
        assert w0[name].shape == w1[name].shape
        assert not torch.equal(w0[name], w1[name]), name
    # The chat template and processor configs do not depend on the seed.
    assert h0["chat_template.jinja"] == h1["chat_template.jinja"]
    assert h0["preprocessor_config.json"] == h1["preprocessor_config.json"]


def test_spec_validation() -> None:
    with pytest.raises(GlmvError, match="unknown variant 'glm-5v'"):
        TinyCheckpointSpec("glm-5v")
    with pytest.raises(GlmvError, match="unknown size"):
        TinyCheckpointSpec("glm-4.5v", size="huge")
    with pytest.raises(GlmvError, match="unknown dtype"):
        TinyCheckpointSpec("glm-4.5v", dtype="int8")
    with pytest.raises(GlmvError, match="max_shard_bytes"):
        TinyCheckpointSpec("glm-4.5v", max_shard_bytes=0)


# ----------------------------------------------------------------------- transformers load


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_loads_every_variant(variant: str, tiny_checkpoint: Any) -> None:
    ckpt = tiny_checkpoint(variant)
    model, info = _load_hf(ckpt)
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    assert not info["error_msgs"]
    assert type(model).__name__ == ARCHITECTURE[variant]
    assert model.dtype == torch.bfloat16
    # The weights are the file's, not a fresh random init.
    file_weights = _weights(ckpt)
    loaded = model.state_dict()
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight",
                 "model.visual.patch_embed.proj.weight", "model.language_model.norm.weight"):
        assert torch.equal(loaded[name], file_weights[name]), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_processor_class(variant: str, tiny_checkpoint: Any, hf_processor: Any) -> None:
    ckpt = tiny_checkpoint(variant)
    processor = hf_processor(variant)
    assert type(processor).__name__ == PROCESSOR_CLASS[variant]
    family = "Glm46V" if PROCESSOR_CLASS[variant] == "Glm46VProcessor" else "Glm4v"
    image_cfg = json.loads((ckpt / "preprocessor_config.json").read_text("utf-8"))
    video_cfg = json.loads((ckpt / "video_preprocessor_config.json").read_text("utf-8"))
    assert image_cfg["processor_class"] == video_cfg["processor_class"] == PROCESSOR_CLASS[variant]
    assert image_cfg["image_processor_type"] == f"{family}ImageProcessor"
    assert video_cfg["video_processor_type"] == f"{family}VideoProcessor"
    assert type(processor.video_processor).__name__ == f"{family}VideoProcessor"


@pytest.mark.parametrize("variant", VARIANTS)
def test_readme_says_random_weights(variant: str, tiny_checkpoint: Any) -> None:
    readme = (tiny_checkpoint(variant) / "README.md").read_text("utf-8")
    assert "RANDOM WEIGHTS" in readme
    assert variant in readme
    num_params = sum(t.numel() for t in _weights(tiny_checkpoint(variant)).values())
    assert f"{num_params:,}" in readme


# -------------------------------------------------------------------------------- sharding


def test_sharded_checkpoint_layout_and_index(tiny_checkpoint: Any) -> None:
    whole = tiny_checkpoint("glm-4.6v-flash")
    sharded = tiny_checkpoint("glm-4.6v-flash", max_shard_bytes=SHARD_BYTES)
    names = sorted(p.name for p in sharded.glob("*.safetensors"))
    num = len(names)
    assert num > 1
    assert names == [f"model-{i:05d}-of-{num:05d}.safetensors" for i in range(1, num + 1)]
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text("utf-8"))
    weight_map: dict[str, str] = index["weight_map"]
    seen: dict[str, str] = {}
    for name in names:
        shard = load_file(str(sharded / name))
        nbytes = sum(t.numel() * t.element_size() for t in shard.values())
        assert nbytes <= SHARD_BYTES or len(shard) == 1, name  # only a lone big tensor overflows
        for key in shard:
            assert key not in seen, f"{key} in {seen.get(key)} and {name}"
            seen[key] = name
    assert weight_map == seen  # every tensor exactly once, pointing at the file that holds it
    reference = _weights(whole)
    assert set(weight_map) == set(reference)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in reference.values())
    sharded_weights = _weights(sharded)
    for key, tensor in reference.items():
        assert torch.equal(sharded_weights[key], tensor), key


def test_transformers_loads_sharded_checkpoint_to_same_weights(tiny_checkpoint: Any) -> None:
    whole, _ = _load_hf(tiny_checkpoint("glm-4.6v-flash"))
    sharded, info = _load_hf(tiny_checkpoint("glm-4.6v-flash", max_shard_bytes=SHARD_BYTES))
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    a, b = whole.state_dict(), sharded.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------ FP8


def _dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = q.shape
    scale = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.float() * scale[:rows, :cols]


def test_fp8_checkpoint(tiny_checkpoint: Any) -> None:
    ckpt = tiny_checkpoint("glm-4.5v", fp8=True)
    reference = _weights(tiny_checkpoint("glm-4.5v"))  # same seed, bf16
    quant = json.loads((ckpt / "config.json").read_text("utf-8"))["quantization_config"]
    assert quant["quant_method"] == "fp8" and quant["activation_scheme"] == "dynamic"
    block = tuple(quant["weight_block_size"])
    assert len(block) == 2
    keep = set(quant["modules_to_not_convert"])
    # Embeddings, head, routers, vision attention and convolutions stay high precision.
    for module in ("model.language_model.embed_tokens", "lm_head",
                   "model.language_model.layers.1.mlp.gate",
                   "model.language_model.layers.2.mlp.gate",
                   "model.visual.blocks.0.attn.qkv", "model.visual.blocks.1.attn.proj",
                   "model.visual.patch_embed.proj", "model.visual.downsample"):
        assert module in keep, module
    state = _weights(ckpt)
    scales = {k for k in state if k.endswith(".weight_scale_inv")}
    assert set(state) - scales == set(reference)
    num_fp8 = 0
    for name, ref in reference.items():
        tensor = state[name]
        module = name.rsplit(".", 1)[0]
        scale_name = f"{module}.weight_scale_inv"
        quantized = name.endswith(".weight") and ref.dim() == 2 and module not in keep
        if not quantized:
            if name.endswith(".weight"):
                assert scale_name not in state, name
            assert tensor.dtype == ref.dtype and torch.equal(tensor, ref), name
            continue
        num_fp8 += 1
        rows, cols = ref.shape
        scale_inv = state[scale_name]
        assert tensor.dtype == torch.float8_e4m3fn, name
        assert scale_inv.dtype == torch.float32
        assert tuple(scale_inv.shape) == (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
        deq, ref32 = _dequantize(tensor, scale_inv, block), ref.float()
        # e4m3 keeps 3 mantissa bits: at most half a step (1/16 relative) per normal value and
        # 2^-10 x scale in the subnormal range.
        per_elem = ref32.abs() / 16 + scale_inv.repeat_interleave(block[0], 0).repeat_interleave(
            block[1], 1)[:rows, :cols] * 2**-10
        assert ((deq - ref32).abs() <= per_elem * 1.001 + 1e-12).all(), name
        # Overall: relative Frobenius error below 5%.
        assert (deq - ref32).norm() / ref32.norm() < 0.05, name
    assert num_fp8 == len(scales) > 0
    # Every expert projection is FP8; every kept module's weight is bf16.
    assert state["model.language_model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == (
        torch.float8_e4m3fn)
    for module in keep:
        assert state[f"{module}.weight"].dtype == torch.bfloat16, module
    assert state["model.language_model.layers.1.mlp.gate.e_score_correction_bias"].dtype == (
        torch.float32)


# ------------------------------------------------------------------------------ bench size


@pytest.mark.parametrize("variant", VARIANTS)
def test_bench_size_config_without_writing(variant: str) -> None:
    spec = SPECS[variant]
    # Ids as in the real tokenizers: the added tokens follow the BPE vocabulary from 151329.
    ids = {content: 151329 + i for i, (content, _) in enumerate(spec.added_tokens)}
    cfg = build_config(spec, "bench", ids, pad_vocab(8192 + len(ids), "bench"))
    text = cfg["text_config"]
    assert text["vocab_size"] == REAL_VOCAB_SIZE == 151552
    assert text["rope_scaling"]["mrope_section"] == [8, 12, 12]
    if spec.is_moe:
        assert text["head_dim"] == 128
    else:
        assert "head_dim" not in text
        assert text["hidden_size"] // text["num_attention_heads"] == 128
    model_cfg = ModelConfig.from_dict(cfg)
    assert model_cfg.text.head_dim == 128
    assert model_cfg.text.rotary_dim == 64 == 2 * sum(model_cfg.text.mrope_section)
    assert model_cfg.image_token_id == ids["<|image|>"]
    num_params = sum(math.prod(shape) for _, shape, _ in expected_tensors(model_cfg))
    assert 2e8 < num_params < 9e8, f"{num_params:,}"  # "a few hundred million"


def test_checkpoint_tensor_names_follow_published_layout(tiny_checkpoint: Any) -> None:
    for variant in VARIANTS:
        names = set(_weights(tiny_checkpoint(variant)))
        assert all(re.match(r"^(model\.(visual|language_model)\.|lm_head\.)", n) for n in names)
        is_moe = SPECS[variant].is_moe
        assert any(".mlp.experts." in n for n in names) == is_moe
        assert any("post_self_attn_layernorm" in n for n in names) == (not is_moe)
