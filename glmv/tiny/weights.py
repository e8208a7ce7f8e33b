"""Random weights under the published tensor names, and the block-wise FP8 form of them."""

from __future__ import annotations

import re

import torch

from glmv.checkpoint import expected_tensors
from glmv.config import ModelConfig


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
    for name, shape, kind in expected_tensors(cfg):  # the list the loader checks
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
