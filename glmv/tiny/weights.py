"""Random weights under the published tensor names, and the block-wise FP8 form of them.

Names and shapes are derived from config.json alone (protocol section 7.4), independently of
glmv's model code, so a loader or model bug cannot hide behind a matching writer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from glmv.config import ModelConfig

# (name, shape, kind); kind decides the init: "linear", "embed", "norm", "bias", "route_bias".
TensorSpec = tuple[str, tuple[int, ...], str]


def _linear(name: str, out_dim: int, in_dim: int, bias: bool = False) -> Iterator[TensorSpec]:
    yield f"{name}.weight", (out_dim, in_dim), "linear"
    if bias:
        yield f"{name}.bias", (out_dim,), "bias"


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
        yield from _linear(f"{b}.mlp.gate_proj", out, hid)
        yield from _linear(f"{b}.mlp.up_proj", out, hid)
        yield from _linear(f"{b}.mlp.down_proj", hid, out)
    yield f"{p}.post_layernorm.weight", (hid,), "norm"
    yield f"{p}.downsample.weight", (out, hid, m, m), "linear"
    yield f"{p}.downsample.bias", (out,), "bias"
    yield from _linear(f"{p}.merger.proj", out, out)
    yield f"{p}.merger.post_projection_norm.weight", (out,), "norm"
    yield f"{p}.merger.post_projection_norm.bias", (out,), "bias"
    yield from _linear(f"{p}.merger.gate_proj", v.intermediate_size, out)
    yield from _linear(f"{p}.merger.up_proj", v.intermediate_size, out)
    yield from _linear(f"{p}.merger.down_proj", out, v.intermediate_size)


def _mlp(name: str, hidden: int, inter: int) -> Iterator[TensorSpec]:
    yield from _linear(f"{name}.gate_proj", inter, hidden)
    yield from _linear(f"{name}.up_proj", inter, hidden)
    yield from _linear(f"{name}.down_proj", hidden, inter)


def text_tensors(cfg: ModelConfig) -> Iterator[TensorSpec]:
    t = cfg.text
    p = "model.language_model"
    h = t.hidden_size
    yield f"{p}.embed_tokens.weight", (t.vocab_size, h), "embed"
    for i in range(t.num_hidden_layers):
        layer = f"{p}.layers.{i}"
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
            shared = moe.moe_intermediate_size * moe.n_shared_experts
            yield from _mlp(f"{layer}.mlp.shared_experts", h, shared)
    yield f"{p}.norm.weight", (h,), "norm"
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (t.vocab_size, h), "linear"


def checkpoint_tensors(cfg: ModelConfig) -> list[TensorSpec]:
    return [*vision_tensors(cfg), *text_tensors(cfg)]


def _init(shape: tuple[int, ...], kind: str, gen: torch.Generator) -> torch.Tensor:
    """Scales that keep activations O(1) through random layers, so every path moves the logits."""
    x = torch.randn(shape, generator=gen, dtype=torch.float32)
    if kind == "linear":
        fan_in = 1
        for d in shape[1:]:
            fan_in *= d
        return x * fan_in**-0.5
    if kind == "norm":
        return 1.0 + 0.1 * x
    if kind in ("bias", "route_bias"):
        return 0.05 * x
    return x  # embeddings


def random_state_dict(cfg: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Deterministic for a seed. The router correction bias stays float32, as published."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape, kind in checkpoint_tensors(cfg):
        tensor = _init(shape, kind, gen)
        state[name] = tensor if kind == "route_bias" else tensor.to(dtype)
    return state


# Modules the published FP8 checkpoints keep in high precision: embeddings, head, routers and
# the vision tower's attention and convolutions. Everything else that is a Linear is FP8.
_FP8_KEEP = re.compile(
    r"(embed_tokens|lm_head|\.mlp\.gate$|visual\.blocks\.\d+\.attn\.|patch_embed|downsample"
    r"|embeddings\.position_embedding)"
)


def fp8_quantizable(name: str, tensor: torch.Tensor) -> bool:
    module = name.rsplit(".", 1)[0]
    return name.endswith(".weight") and tensor.dim() == 2 and not _FP8_KEEP.search(module)


def quantize_fp8_blockwise(
    weight: torch.Tensor, block: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, weight_scale_inv) with one float32 scale per [rows x cols] block.

    Edge blocks may be partial when a dimension is not a multiple of the block size.
    """
    rows, cols = weight.shape
    br, bc = block
    w = weight.float()
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(nr * br, nc * bc)
    padded[:rows, :cols] = w
    blocks = padded.view(nr, br, nc, bc)  # [nr, br, nc, bc]
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [nr, nc]
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max
    q = (blocks / scale_inv[:, None, :, None]).to(torch.float8_e4m3fn)
    return q.view(nr * br, nc * bc)[:rows, :cols].contiguous(), scale_inv


def fp8_modules_not_converted(names: list[str]) -> list[str]:
    """Module names listed in quantization_config.modules_to_not_convert."""
    modules = {n.rsplit(".", 1)[0] for n in names if n.endswith(".weight")}
    return sorted(m for m in modules if _FP8_KEEP.search(m))
