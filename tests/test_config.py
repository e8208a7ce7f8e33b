"""ModelConfig: values as transformers computes them, rope spellings, layouts, typed errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from glmv.config import ModelConfig
from glmv.errors import ConfigError, GlmvError, UnsupportedModelError
from tests.conftest import VARIANTS

TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "attention_bias",
               "max_position_embeddings", "hidden_act")
VISION_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size", "temporal_patch_size",
                 "spatial_merge_size", "in_channels", "image_size", "out_hidden_size",
                 "intermediate_size", "hidden_act", "rms_norm_eps", "attention_bias")
MOE_FIELDS = ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
              "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group",
              "norm_topk_prob", "routed_scaling_factor")
TOKEN_ID_FIELDS = ("image_token_id", "video_token_id", "image_start_token_id",
                   "image_end_token_id", "video_start_token_id", "video_end_token_id")


def _raw(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "config.json").read_text("utf-8"))


def _hf_text_modules(model_type: str) -> tuple[Any, Any]:
    """(rotary embedding class, attention class) of transformers' text decoder."""
    pytest.importorskip("transformers", reason="transformers is the reference")
    if model_type == "glm4v":
        from transformers.models.glm4v import modeling_glm4v as m

        return m.Glm4vTextRotaryEmbedding, m.Glm4vTextAttention
    from transformers.models.glm4v_moe import modeling_glm4v_moe as mm

    return mm.Glm4vMoeTextRotaryEmbedding, mm.Glm4vMoeTextAttention


def _hf_config(data: dict[str, Any]) -> Any:
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    return transformers.AutoConfig.for_model(**copy.deepcopy(data))


def _hf_rotary_dim(hf: Any) -> int:
    rotary_cls, _ = _hf_text_modules(hf.model_type)
    return 2 * len(rotary_cls(config=hf.text_config).inv_freq)


# ------------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers(variant: str, tiny_checkpoint: Any) -> None:
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    ckpt = tiny_checkpoint(variant)
    ours = ModelConfig.from_pretrained(ckpt)
    hf = transformers.AutoConfig.from_pretrained(ckpt)
    ht = hf.text_config
    assert ours.model_type == hf.model_type
    assert ours.architecture == hf.architectures[0]
    for name in TEXT_FIELDS:
        assert getattr(ours.text, name) == getattr(ht, name), name
    for name in VISION_FIELDS:
        assert getattr(ours.vision, name) == getattr(hf.vision_config, name), name
    assert ours.vision.rope_theta == hf.vision_config.rope_parameters["rope_theta"]
    assert ours.text.rope_theta == ht.rope_parameters["rope_theta"]
    assert list(ours.text.mrope_section) == ht.rope_parameters["mrope_section"]
    rotary_cls, attention_cls = _hf_text_modules(hf.model_type)
    # Rotary dim as transformers computes it: 2 x len(inv_freq).
    assert ours.text.rotary_dim == 2 * len(rotary_cls(config=ht).inv_freq)
    # head_dim: glm4v_moe reads the head_dim key, glm4v derives hidden / heads.
    attention = attention_cls(ht, layer_idx=0)
    assert ours.text.head_dim == attention.head_dim
    assert ours.text.q_size == attention.q_proj.out_features
    assert ours.text.kv_size == attention.k_proj.out_features
    assert ours.eos_token_ids == tuple(ht.eos_token_id)
    assert ours.pad_token_id == ht.pad_token_id
    for name in TOKEN_ID_FIELDS:
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.tie_word_embeddings == hf.tie_word_embeddings is False
    assert ours.dtype == "bfloat16"
    if hf.model_type == "glm4v_moe":
        assert ours.text.moe is not None
        for name in MOE_FIELDS:
            assert getattr(ours.text.moe, name) == getattr(ht, name), name
        assert ours.text.rope_style == "neox" and not ours.text.sandwich_norm
    else:
        assert ours.text.moe is None
        assert ours.text.rope_style == "interleaved" and ours.text.sandwich_norm
    assert ours.quantization is None


@pytest.mark.parametrize("variant", VARIANTS)
def test_transformers_5_serialization_parses_to_same_config(variant: str,
                                                            tiny_checkpoint: Any) -> None:
    """transformers writes `rope_parameters`; the checkpoint has the legacy rope keys."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    ckpt = tiny_checkpoint(variant)
    ours = ModelConfig.from_pretrained(ckpt)
    written = transformers.AutoConfig.from_pretrained(ckpt).to_dict()
    assert "rope_parameters" in written["text_config"]
    assert "rope_theta" not in written["text_config"]
    again = ModelConfig.from_dict(written)
    assert again.text == ours.text
    assert again.vision == ours.vision
    assert again.eos_token_ids == ours.eos_token_ids
    assert [getattr(again, n) for n in TOKEN_ID_FIELDS] == [getattr(ours, n)
                                                            for n in TOKEN_ID_FIELDS]


@pytest.mark.parametrize("variant", VARIANTS)
def test_both_rope_spellings_parse_to_the_same_text_config(variant: str,
                                                           tiny_checkpoint: Any) -> None:
    legacy = _raw(tiny_checkpoint(variant))
    text = legacy["text_config"]
    assert {"rope_theta", "partial_rotary_factor", "rope_scaling"} <= set(text)
    modern = copy.deepcopy(legacy)
    mt = modern["text_config"]
    mt["rope_parameters"] = {
        "rope_type": "default", "rope_theta": mt.pop("rope_theta"),
        "partial_rotary_factor": mt.pop("partial_rotary_factor"),
        "mrope_section": mt.pop("rope_scaling")["mrope_section"],
    }
    a, b = ModelConfig.from_dict(legacy), ModelConfig.from_dict(modern)
    assert a.text == b.text
    assert a.text.rotary_dim == 2 * sum(a.text.mrope_section)
    # A mixed file (legacy theta, 5.x parameters) merges the same way.
    mixed = copy.deepcopy(modern)
    mixed["text_config"]["rope_theta"] = mixed["text_config"]["rope_parameters"].pop("rope_theta")
    assert ModelConfig.from_dict(mixed).text == a.text


@pytest.mark.parametrize("variant", VARIANTS)
def test_flat_legacy_layout(variant: str, tiny_checkpoint: Any) -> None:
    nested = _raw(tiny_checkpoint(variant))
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    flat.update({k: v for k, v in nested["text_config"].items() if k != "model_type"})
    assert "text_config" not in flat and "hidden_size" in flat
    a, b = ModelConfig.from_dict(nested), ModelConfig.from_dict(flat)
    assert a.text == b.text and a.vision == b.vision
    assert a.eos_token_ids == b.eos_token_ids and a.pad_token_id == b.pad_token_id
    assert a.image_token_id == b.image_token_id


@pytest.mark.parametrize(("model_type", "mrope_section"), [("glm4v", [4, 6, 6]),
                                                           ("glm4v_moe", [2, 3, 3])])
def test_partial_rotary_factor_default_matches_transformers(
        model_type: str, mrope_section: list[int], tiny_checkpoint: Any) -> None:
    """Without partial_rotary_factor transformers rotates all of head_dim for glm4v, half for
    glm4v_moe; the mrope_section is sized to fit."""
    variant = "glm-4.1v-thinking" if model_type == "glm4v" else "glm-4.5v"
    data = _raw(tiny_checkpoint(variant))
    del data["text_config"]["partial_rotary_factor"]
    data["text_config"]["rope_scaling"]["mrope_section"] = mrope_section
    ours = ModelConfig.from_dict(data)
    assert ours.text.rotary_dim == _hf_rotary_dim(_hf_config(data))
    assert ours.text.rotary_dim == 2 * sum(mrope_section)


def test_fp8_quantization_config(tiny_checkpoint: Any) -> None:
    ckpt = tiny_checkpoint("glm-4.5v", fp8=True)
    quant = ModelConfig.from_pretrained(ckpt).quantization
    raw = _raw(ckpt)["quantization_config"]
    assert quant is not None and quant.method == "fp8"
    assert list(quant.weight_block_size) == raw["weight_block_size"]
    assert list(quant.modules_to_not_convert) == raw["modules_to_not_convert"]
    assert quant.activation_scheme == "dynamic"


# ----------------------------------------------------------------------------------- errors


@pytest.fixture
def dense(tiny_checkpoint: Any) -> dict[str, Any]:
    return _raw(tiny_checkpoint("glm-4.6v-flash"))


@pytest.fixture
def moe(tiny_checkpoint: Any) -> dict[str, Any]:
    return _raw(tiny_checkpoint("glm-4.6v"))


def _raises(exc_type: type[GlmvError], data: dict[str, Any], *fragments: str) -> str:
    with pytest.raises(exc_type) as info:
        ModelConfig.from_dict(data)
    assert info.type is exc_type  # exactly this class, not a sibling
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_unknown_model_type(dense: dict[str, Any]) -> None:
    dense["model_type"] = "qwen2_5_vl"
    _raises(UnsupportedModelError, dense, "'qwen2_5_vl'", "glm4v", "glm4v_moe")
    del dense["model_type"]
    _raises(UnsupportedModelError, dense, "None")


def test_architecture_must_match_model_type(dense: dict[str, Any]) -> None:
    dense["architectures"] = ["Glm4vMoeForConditionalGeneration"]
    _raises(UnsupportedModelError, dense, "Glm4vMoeForConditionalGeneration", "'glm4v'")


def test_missing_or_invalid_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config\.json not found"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "glm4v",', "utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("[]", "utf-8")
    with pytest.raises(ConfigError, match="JSON object"):
        ModelConfig.from_pretrained(tmp_path)


def test_missing_vision_config(dense: dict[str, Any]) -> None:
    del dense["vision_config"]
    _raises(ConfigError, dense, "vision_config")


@pytest.mark.parametrize("bad", ["151343", 151343.0, None, True])
def test_non_integer_token_id(bad: Any, dense: dict[str, Any]) -> None:
    dense["image_token_id"] = bad
    dense["text_config"]["image_token_id"] = bad
    _raises(ConfigError, dense, "image_token_id", repr(bad))


def test_missing_token_id(dense: dict[str, Any]) -> None:
    del dense["video_start_token_id"]
    _raises(ConfigError, dense, "video_start_token_id")


@pytest.mark.parametrize("spelling", ["legacy", "rope_parameters"])
def test_mrope_section_must_match_rotary_dim(spelling: str, moe: dict[str, Any]) -> None:
    text = moe["text_config"]
    if spelling == "legacy":
        text["rope_scaling"]["mrope_section"] = [2, 3, 4]
    else:
        text["rope_parameters"] = {"rope_type": "default", "mrope_section": [2, 3, 4]}
    # head_dim 32 x partial_rotary_factor 0.5 = 16 rotary dims, the section covers 18.
    _raises(ConfigError, moe, "mrope_section [2, 3, 4]", "18", "16", "partial_rotary_factor")
    text.pop("rope_parameters", None)
    text["rope_scaling"]["mrope_section"] = [8, 8]
    _raises(ConfigError, moe, "three positive integers", "[8, 8]")


@pytest.mark.parametrize("where", ["rope_scaling", "rope_parameters"])
def test_unsupported_rope_type(where: str, dense: dict[str, Any]) -> None:
    key = "type" if where == "rope_scaling" else "rope_type"
    dense["text_config"][where] = {key: "yarn", "factor": 4.0, "mrope_section": [2, 3, 3]}
    _raises(UnsupportedModelError, dense, "'yarn'", "rope")


def test_use_qk_norm_is_refused(moe: dict[str, Any]) -> None:
    moe["text_config"]["use_qk_norm"] = True
    _raises(UnsupportedModelError, moe, "use_qk_norm")


def test_unsupported_quantization(moe: dict[str, Any]) -> None:
    moe["quantization_config"] = {"quant_method": "awq", "bits": 4}
    _raises(UnsupportedModelError, moe, "'awq'", "fp8")
    moe["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3"}
    _raises(ConfigError, moe, "weight_block_size")


def test_bad_dimensions(dense: dict[str, Any], moe: dict[str, Any]) -> None:
    bad = copy.deepcopy(dense)
    bad["text_config"]["hidden_size"] = -128
    _raises(ConfigError, bad, "hidden_size", "positive integer")
    bad = copy.deepcopy(dense)
    bad["text_config"]["num_key_value_heads"] = 3
    _raises(ConfigError, bad, "divisible by num_key_value_heads")
    bad = copy.deepcopy(dense)
    bad["vision_config"]["out_hidden_size"] = 64
    _raises(ConfigError, bad, "out_hidden_size 64", "hidden_size 128")
    bad = copy.deepcopy(dense)
    bad["text_config"]["hidden_act"] = "gelu"
    _raises(ConfigError, bad, "'gelu'")
    del bad["text_config"]["hidden_act"]
    del bad["text_config"]["vocab_size"]
    bad.pop("vocab_size", None)
    _raises(ConfigError, bad, "'vocab_size'")
    bad = copy.deepcopy(moe)
    bad["text_config"]["num_experts_per_tok"] = 99
    _raises(ConfigError, bad, "num_experts_per_tok")


def test_errors_are_client_errors() -> None:
    assert issubclass(UnsupportedModelError, ConfigError)
    assert ConfigError.http_status == UnsupportedModelError.http_status == 400
