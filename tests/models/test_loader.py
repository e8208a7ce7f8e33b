"""The production loader: every tensor lands where the checkpoint says, in the asked dtype; FP8
blocks dequantize exactly; every way a checkpoint can be wrong is a typed error naming it.

Expected parameters are rebuilt here from the safetensors files with an independent packing
(q/k/v rows, gate/up rows, stacked experts) and an independent block-by-block FP8 dequantization,
so a bug in the loader's name rules or in `dequantize_fp8` cannot hide behind itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from glmv.checkpoint import CheckpointReader
from glmv.errors import CheckpointError, ConfigError, UnsupportedModelError, WeightMismatchError
from glmv.models.glm4v import Glm4vForConditionalGeneration
from glmv.models.loader import load_model
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import MultiModalProcessor, ProcessedPrompt
from tests.conftest import VARIANTS, copy_checkpoint
from tests.helpers import glmv_logits

HOUSE = Path(__file__).resolve().parents[2] / "examples" / "house.png"
SHARD_BYTES = 300_000  # same spec as tests/test_checkpoint_writer.py: written once per session
ROUTE_BIAS = "e_score_correction_bias"
SCALE = ".weight_scale_inv"
Q_PROJ = "model.language_model.layers.0.self_attn.q_proj.weight"  # FP8 in the FP8 form
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- helpers


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in the folder, as stored."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(path)))
    return state


def dequantize_reference(weight: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int]) -> torch.Tensor:
    """weight * scale_inv, one block at a time (edge blocks partial)."""
    rows, cols = weight.shape
    br, bc = block
    assert scale_inv.shape == (-(-rows // br), -(-cols // bc))
    out = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            r, c = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            out[r, c] = weight[r, c].to(torch.float32) * scale_inv[i, j].to(torch.float32)
    return out


def logical_state(folder: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors with FP8 weights dequantized (float32) and scales dropped."""
    raw = file_tensors(folder)
    quant = json.loads((folder / "config.json").read_text()).get("quantization_config")
    state = {}
    for name, tensor in raw.items():
        if name.endswith(SCALE):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            rows, cols = quant["weight_block_size"]
            scale = raw[name[: -len("weight")] + "weight_scale_inv"]
            tensor = dequantize_reference(tensor, scale, (rows, cols))
        state[name] = tensor
    return state


def packed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> the model's parameters: qkv_proj = cat(q, k, v) rows,
    gate_up_proj = cat(gate, up) rows, experts w13[e] = cat(gate_e, up_e), w2[e] = down_e."""
    left = dict(state)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, set[int]] = {}
    for name in state:
        m = re.fullmatch(r"(.*\.mlp\.experts)\.(\d+)\.down_proj\.weight", name)
        if m:
            experts.setdefault(m[1], set()).add(int(m[2]))
    for prefix, ids in experts.items():
        assert ids == set(range(len(ids)))
        w13, w2 = [], []
        for e in sorted(ids):
            gate = left.pop(f"{prefix}.{e}.gate_proj.weight")
            up = left.pop(f"{prefix}.{e}.up_proj.weight")
            w13.append(torch.cat([gate, up]))
            w2.append(left.pop(f"{prefix}.{e}.down_proj.weight"))
        out[f"{prefix}.w13"], out[f"{prefix}.w2"] = torch.stack(w13), torch.stack(w2)
    for name in list(left):
        m = re.fullmatch(r"(.*\.self_attn)\.q_proj\.(weight|bias)", name)
        if m:
            parts = [left.pop(f"{m[1]}.{p}_proj.{m[2]}") for p in "qkv"]
            out[f"{m[1]}.qkv_proj.{m[2]}"] = torch.cat(parts)
        m = re.fullmatch(r"(.*)\.gate_proj\.weight", name)
        if m:
            gate, up = left.pop(name), left.pop(f"{m[1]}.up_proj.weight")
            out[f"{m[1]}.gate_up_proj.weight"] = torch.cat([gate, up])
    out.update(left)  # everything else loads under its own name
    return out


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def assert_params_equal_file(model: torch.nn.Module, folder: Path) -> None:
    want = packed(logical_state(folder))
    got = params(model)
    assert set(got) == set(want)
    for name, param in got.items():
        expected = want[name]
        assert param.shape == expected.shape, name
        dtype = torch.float32 if name.endswith(ROUTE_BIAS) else param.dtype
        assert torch.equal(param, expected.to(dtype)), name


def rewrite(src: Path, dst: Path, edit: Callable[[dict[str, torch.Tensor]], object] | None = None,
            config: Callable[[dict[str, Any]], object] | None = None) -> Path:
    """A copy of `src` whose tensors (re-saved as one file) and config.json were edited."""
    copy_checkpoint(src, dst)
    if edit is not None:
        state = file_tensors(dst)
        edit(state)
        for path in [*dst.glob("*.safetensors"), *dst.glob("*.index.json")]:
            path.unlink()
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if config is not None:
        data = json.loads((dst / "config.json").read_text())
        config(data)
        (dst / "config.json").write_text(json.dumps(data))
    return dst


def prompts(folder: Path) -> dict[str, ProcessedPrompt]:
    proc = MultiModalProcessor.from_pretrained(folder, media_policy=MediaPolicy.local())
    text = [{"role": "user", "content": "Describe the weather in Beijing today, then count."}]
    image = [{"role": "user", "content": [
        {"type": "image", "image": PIL.Image.open(HOUSE).convert("RGB")},
        {"type": "text", "text": "What is in this picture?"}]}]
    out = {"text": proc.process_chat(text), "image": proc.process_chat(image)}
    assert out["image"].num_image_tokens > 0
    return out


def load(folder: Path, **kwargs: Any) -> Glm4vForConditionalGeneration:
    return load_model(folder, progress=False, **kwargs)


# --------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_parameter_equals_the_file(variant: str, tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint(variant)
    model = load(folder, dtype="float32")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert_params_equal_file(model, folder)


@pytest.mark.parametrize("variant", ["glm-4.6v-flash", "glm-4.5v"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32",
                                   pytest.param(torch.float16, id="torch.float16")])
def test_dtype_conversion(variant: str, dtype: str | torch.dtype, tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint(variant)
    model = load(folder, dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else DTYPES[dtype]
    got = params(model)
    for name, param in got.items():
        assert param.dtype == (torch.float32 if name.endswith(ROUTE_BIAS) else want), name
    assert_params_equal_file(model, folder)
    if variant == "glm-4.5v":
        assert any(name.endswith(ROUTE_BIAS) for name in got)
    assert torch.get_default_dtype() == torch.float32  # the loader restores the default


@pytest.mark.parametrize("stored", ["bfloat16", "float32"])
def test_auto_dtype_is_the_config_dtype(stored: str, tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint("glm-4.5v") if stored == "bfloat16" else tiny_checkpoint(
        "glm-4.5v", dtype="float32")
    assert json.loads((folder / "config.json").read_text())["dtype"] == stored
    for name, param in params(load(folder, dtype="auto")).items():
        assert param.dtype == (torch.float32 if name.endswith(ROUTE_BIAS) else DTYPES[stored])


def test_unknown_dtype_is_rejected(tiny_checkpoint: Any) -> None:
    """A bad dtype is the user's setting, not a broken checkpoint: ConfigError (HTTP 400)."""
    with pytest.raises(ConfigError, match="float8"):
        load(tiny_checkpoint("glm-4.6v-flash"), dtype="float8")


# --------------------------------------------------------------------------- shards


@pytest.mark.parametrize("variant", ["glm-4.6v-flash", "glm-4.5v"])
def test_sharded_checkpoint_loads_like_the_single_file(
        variant: str, tiny_checkpoint: Any, capsys: pytest.CaptureFixture[str]) -> None:
    sharded = tiny_checkpoint(variant, max_shard_bytes=SHARD_BYTES)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    capsys.readouterr()
    model = load_model(sharded, dtype="float32", progress=True)
    assert "Loading weights" in capsys.readouterr().err  # the bar ran through every shard
    single = load(tiny_checkpoint(variant), dtype="float32")
    ref = params(single)
    got = params(model)
    assert set(got) == set(ref)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    load_model(sharded, dtype="float32", progress=False)
    assert capsys.readouterr().err == ""


def test_missing_shard_is_named(tiny_checkpoint: Any, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_checkpoint("glm-4.6v-flash", max_shard_bytes=SHARD_BYTES),
                             tmp_path / "ckpt")
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=re.escape(shard.name)):
        load(folder)


@pytest.mark.parametrize("text", ["{not json", '{"metadata": {}}', "[1, 2]"])
def test_bad_index_is_a_checkpoint_error(text: str, tiny_checkpoint: Any, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_checkpoint("glm-4.6v-flash", max_shard_bytes=SHARD_BYTES),
                             tmp_path / "ckpt")
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json"):
        load(folder)


# --------------------------------------------------------------------------- bad folders


def test_unknown_model_type(tiny_checkpoint: Any, tmp_path: Path) -> None:
    folder = rewrite(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "ckpt",
                     config=lambda c: c.update(model_type="llava_next"))
    with pytest.raises(UnsupportedModelError, match="llava_next"):
        load(folder)


def test_missing_config(tiny_checkpoint: Any, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "ckpt")
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"config\.json"):
        load(folder)


def test_no_safetensors(tiny_checkpoint: Any, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "ckpt")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"safetensors") as info:
        load(folder)
    assert str(folder) in str(info.value)


@pytest.mark.parametrize("damage", ["truncate-data", "truncate-header", "garbage"])
def test_corrupt_safetensors_names_the_file(damage: str, tiny_checkpoint: Any,
                                            tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "ckpt")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncate-data":
        path.write_bytes(data[: len(data) // 2])  # header intact, tensor data cut
    elif damage == "truncate-header":
        path.write_bytes(data[:100])
    else:
        path.write_bytes(b"\x89PNG not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError) as info:
        load(folder)
    assert not isinstance(info.value, WeightMismatchError)
    assert "model.safetensors" in str(info.value)


MOE_LAYER = "model.language_model.layers.1"
DROPPED = f"{MOE_LAYER}.mlp.experts.3.up_proj.weight"
EXTRA = f"{MOE_LAYER}.mlp.experts.8.down_proj.weight"  # tiny glm-4.5v has experts 0..7
RESHAPED = "model.language_model.layers.0.self_attn.k_proj.weight"
VISION_DROPPED = "model.visual.blocks.1.norm2.weight"


def _drop(state: dict[str, torch.Tensor]) -> None:
    del state[DROPPED]


def _extra(state: dict[str, torch.Tensor]) -> None:
    state[EXTRA] = torch.zeros(128, 64, dtype=torch.bfloat16)


def _reshape(state: dict[str, torch.Tensor]) -> None:
    state[RESHAPED] = state[RESHAPED][:-8].clone()  # 64 rows -> 56


@pytest.mark.parametrize("edit, missing, unexpected, mismatches", [
    (_drop, [DROPPED], [], []),
    (_extra, [], [EXTRA], []),
    (_reshape, [], [], [(RESHAPED, (56, 128), (64, 128))]),
])
def test_weight_mismatch(edit: Callable[[dict[str, torch.Tensor]], None], missing: list[str],
                         unexpected: list[str], mismatches: list[Any], tiny_checkpoint: Any,
                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = rewrite(tiny_checkpoint("glm-4.5v"), tmp_path / "ckpt", edit)

    def no_reads(self: CheckpointReader, name: str) -> None:
        raise AssertionError(f"read {name} before validating the checkpoint")

    monkeypatch.setattr(CheckpointReader, "get", no_reads)
    with pytest.raises(WeightMismatchError) as info:
        load(folder)
    err = info.value
    assert (err.missing, err.unexpected, err.shape_mismatches) == (missing, unexpected, mismatches)
    message = str(err)
    for name in [*missing, *unexpected, *(m[0] for m in mismatches)]:
        assert name in message
    if mismatches:
        assert "[56, 128]" in message and "[64, 128]" in message
    assert str(folder) in message


def test_every_problem_is_reported_at_once(tiny_checkpoint: Any, tmp_path: Path) -> None:
    def edit(state: dict[str, torch.Tensor]) -> None:
        _drop(state)
        _extra(state)
        _reshape(state)
        del state[VISION_DROPPED]
        state["model.visual.blocks.0.attn.qkv.bias"] = torch.zeros(192)

    folder = rewrite(tiny_checkpoint("glm-4.5v"), tmp_path / "ckpt", edit)
    with pytest.raises(WeightMismatchError) as info:
        load(folder)
    err = info.value
    assert err.missing == sorted([DROPPED, VISION_DROPPED])
    assert err.unexpected == sorted([EXTRA, "model.visual.blocks.0.attn.qkv.bias"])
    assert err.shape_mismatches == [(RESHAPED, (56, 128), (64, 128))]
    for name in [*err.missing, *err.unexpected, RESHAPED]:
        assert name in str(err)


# --------------------------------------------------------------------------- FP8 errors


def test_fp8_weight_without_scale(tiny_checkpoint: Any, tmp_path: Path) -> None:
    folder = rewrite(tiny_checkpoint("glm-4.5v", fp8=True), tmp_path / "ckpt",
                     lambda s: s.pop(Q_PROJ[: -len("weight")] + "weight_scale_inv"))
    with pytest.raises(CheckpointError, match=re.escape(Q_PROJ)) as info:
        load(folder)
    assert "weight_scale_inv" in str(info.value)


def test_fp8_tensors_without_quantization_config(tiny_checkpoint: Any, tmp_path: Path) -> None:
    folder = rewrite(tiny_checkpoint("glm-4.5v", fp8=True), tmp_path / "ckpt",
                     config=lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="quantization_config"):
        load(folder)


def test_scales_without_quantization_config(tiny_checkpoint: Any, tmp_path: Path) -> None:
    """A bf16 checkpoint carrying a stray scale cannot be dequantized: say why."""
    scale = Q_PROJ[: -len("weight")] + "weight_scale_inv"
    folder = rewrite(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "ckpt",
                     lambda s: s.update({scale: torch.ones(4, 3)}))
    with pytest.raises(CheckpointError, match="quantization_config"):
        load(folder)


def test_scale_with_wrong_block_shape(tiny_checkpoint: Any, tmp_path: Path) -> None:
    scale = Q_PROJ[: -len("weight")] + "weight_scale_inv"
    # q_proj is [256, 128] in tiny glm-4.5v: blocks (32, 48) give a [8, 3] scale grid.
    folder = rewrite(tiny_checkpoint("glm-4.5v", fp8=True), tmp_path / "ckpt",
                     lambda s: s.update({scale: torch.ones(4, 3)}))
    with pytest.raises(WeightMismatchError) as info:
        load(folder)
    assert info.value.shape_mismatches == [(scale, (4, 3), (8, 3))]
    assert scale in str(info.value)


# --------------------------------------------------------------------------- FP8 values


@pytest.mark.parametrize("variant", ["glm-4.5v", "glm-4.6v-flash"])
def test_fp8_parameters_are_the_dequantized_blocks(variant: str, tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint(variant, fp8=True)
    raw = file_tensors(folder)
    fp8 = [n for n, t in raw.items() if t.dtype == torch.float8_e4m3fn]
    assert len(fp8) > 10 and Q_PROJ in fp8
    assert all(n[: -len("weight")] + "weight_scale_inv" in raw for n in fp8)
    model = load(folder, dtype="float32")
    assert_params_equal_file(model, folder)  # the file side is dequantized block by block here
    # Dequantized weights are near, not equal to, the unquantized ones of the same seed.
    plain = file_tensors(tiny_checkpoint(variant))
    deq = logical_state(folder)
    for name in fp8:
        ref = plain[name].float()
        assert not torch.equal(deq[name], ref), name
        torch.testing.assert_close(deq[name], ref, rtol=0, atol=0.07 * float(ref.abs().max()))


@pytest.mark.parametrize("variant", ["glm-4.5v", "glm-4.6v-flash"])
def test_unconverted_modules_are_bit_equal(variant: str, tiny_checkpoint: Any) -> None:
    folder = tiny_checkpoint(variant, fp8=True)
    keep = json.loads((folder / "config.json").read_text())["quantization_config"][
        "modules_to_not_convert"]
    assert "lm_head" in keep and "model.language_model.embed_tokens" in keep
    quantized, plain = params(load(folder)), params(load(tiny_checkpoint(variant)))
    for module in keep:
        names = [n for n in plain if n.startswith(module + ".")]
        assert names, module
        for name in names:
            assert quantized[name].dtype == plain[name].dtype
            assert torch.equal(quantized[name], plain[name]), name
    # In the files too: every tensor that is not FP8 is stored bit for bit.
    raw, ref = file_tensors(folder), file_tensors(tiny_checkpoint(variant))
    for name, tensor in raw.items():
        if tensor.dtype != torch.float8_e4m3fn and not name.endswith(SCALE):
            assert torch.equal(tensor, ref[name]), name


# FP8 e4m3 keeps 3 mantissa bits (weights within ~7 % of the bf16 ones). Measured on these tiny
# checkpoints: mean |diff| <= 0.04 x max |logit|, max |diff| <= 0.12 x max |logit| on text. On the
# image prompt the MoE router picks other experts for some tokens (bf16 vs fp32 alone moves
# those rows by 0.45 x max), so the per-element bound is checked on text only there.
MEAN_TOL, TEXT_MAX_TOL = 0.06, 0.25
AGREEMENT = {"text": 0.8, "image": 0.6}


@pytest.mark.parametrize("variant", ["glm-4.5v", "glm-4.6v-flash"])
def test_fp8_logits_match_dequantized_weights(variant: str, tiny_checkpoint: Any,
                                              tmp_path: Path) -> None:
    fp8_folder, plain_folder = tiny_checkpoint(variant, fp8=True), tiny_checkpoint(variant)
    # Same model in a plain checkpoint: FP8 weights replaced by their dequantized values.
    def dequantized(state: dict[str, torch.Tensor]) -> None:
        state.clear()
        state.update(logical_state(fp8_folder))

    deq = rewrite(plain_folder, tmp_path / "dequantized", dequantized)
    assert not any(n.endswith(SCALE) for n in file_tensors(deq))
    fp8_model = load(fp8_folder, dtype="float32")
    deq_model = load(deq, dtype="float32")
    plain_model = load(plain_folder, dtype="float32")
    for kind, prompt in prompts(plain_folder).items():
        got = glmv_logits(fp8_model, prompt)
        assert torch.equal(got, glmv_logits(deq_model, prompt)), kind
        ref = glmv_logits(plain_model, prompt)
        scale = float(ref.abs().max())
        diff = (got - ref).abs()
        assert float(diff.mean()) <= MEAN_TOL * scale, kind
        if kind == "text" or variant == "glm-4.6v-flash":
            assert float(diff.max()) <= TEXT_MAX_TOL * scale, kind
        agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
        assert float(agree) >= AGREEMENT[kind], kind
        assert float(diff.max()) > 0  # the quantization did change something


# --------------------------------------------------------------------------- tied embeddings


def test_tied_embeddings_share_the_table(tiny_checkpoint: Any, tmp_path: Path) -> None:
    folder = rewrite(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "tied",
                     lambda s: s.pop("lm_head.weight"),
                     lambda c: c.update(tie_word_embeddings=True))
    model = load(folder, dtype="float32")
    embed = model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight is embed
    table = file_tensors(folder)["model.language_model.embed_tokens.weight"].float()
    assert torch.equal(embed, table)
    hidden = torch.randn(3, embed.shape[1])
    torch.testing.assert_close(model.compute_logits(hidden), hidden @ table.T)


def test_tied_checkpoint_with_lm_head_reports_it(tiny_checkpoint: Any, tmp_path: Path) -> None:
    folder = rewrite(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "tied",
                     config=lambda c: c.update(tie_word_embeddings=True))
    with pytest.raises(WeightMismatchError) as info:
        load(folder)
    assert info.value.unexpected == ["lm_head.weight"]
    assert info.value.missing == [] and "lm_head.weight" in str(info.value)
