"""GLM-4.5V and GLM-4.6V (`glm4v_moe`): the vision tower + GLM-4.5-Air MoE decoder.

Decoder layer (pre-norm only):
    h   = x + attn(input_layernorm(x))
    out = h + mlp(post_attention_layernorm(h))
where mlp is a dense SwiGLU for the first `first_k_dense_replace` layers and otherwise
routed experts (top-k of n, sigmoid routing with a correction bias, see layers/moe.py) plus a
shared expert. Attention: q/k/v with bias, more query heads x head_dim than hidden size, M-RoPE in
NeoX halves. Checkpoint experts are stored one by one; they load stacked (w13, w2).
"""

from __future__ import annotations

import torch
from torch import nn

from glmv.attention.metadata import AttentionMetadata
from glmv.config import MoEConfig, TextConfig
from glmv.layers.mlp import GatedMLP
from glmv.layers.moe import FusedExperts, TopkRouter
from glmv.layers.norm import RMSNorm, add_rms_norm
from glmv.layers.rotary import MRotaryEmbedding
from glmv.models.glm4v import (
    QKV_RULES,
    Glm4vForConditionalGeneration,
    Glm4vTextAttention,
    LastRows,
    Rope,
    attend,
    rule,
)

_GATE_UP = {"gate": 0, "up": 1}

MOE_RULES = [
    *QKV_RULES,
    # Routed experts: experts.{e}.gate/up -> w13[e], experts.{e}.down -> w2[e].
    rule(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up)_proj\.weight$", r"\1.w13",
         lambda m: (int(m.group(2)), m.group(3))),
    rule(r"^(.*\.mlp\.experts)\.(\d+)\.down_proj\.weight$", r"\1.w2",
         lambda m: (int(m.group(2)), "down")),
    # Dense MLPs and shared experts: gate/up -> gate_up_proj.
    rule(r"^(model\.language_model\..*\.mlp(?:\.shared_experts)?)\.(gate|up)_proj\.weight$",
         r"\1.gate_up_proj.weight", lambda m: _GATE_UP[m.group(2)]),
]


class Glm4vMoeTextMoE(nn.Module):
    """Routed experts + shared expert.

    Under tensor parallel both come back whole on every rank, so they are simply added: the
    shared expert after its down_proj's all-reduce, the routed experts after their own
    all-reduce (width split) or all-to-all dispatch and gather (expert parallel).
    """

    def __init__(self, hidden_size: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.gate = TopkRouter(hidden_size, cfg)
        self.experts = FusedExperts(cfg.n_routed_experts, hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = GatedMLP(hidden_size,
                                       cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        return self.experts(x, weights, ids) + self.shared_experts(x)


class Glm4vMoeTextDecoderLayer(nn.Module):
    """Pre-norm attention, then a dense MLP (leading layers) or the MoE block."""

    def __init__(self, cfg: TextConfig, layer_idx: int) -> None:
        super().__init__()
        assert cfg.moe is not None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Glm4vTextAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp: nn.Module
        if layer_idx < cfg.moe.first_k_dense_replace:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        else:
            self.mlp = Glm4vMoeTextMoE(cfg.hidden_size, cfg.moe)

    def forward(self, x: torch.Tensor, rope: Rope, rotary: MRotaryEmbedding,
                meta: AttentionMetadata, last: LastRows | None = None) -> torch.Tensor:
        """x [N, hidden] -> [N, hidden]; with `last`, only its rows [R, hidden] (LastRows)."""
        attn, x = attend(self.self_attn, self.input_layernorm(x), x, rope, rotary, meta, last)
        if not x.shape[0]:
            return x
        h, normed = add_rms_norm(attn, x, None, self.post_attention_layernorm)  # h = x + attn
        return h + self.mlp(normed)


class Glm4vMoeForConditionalGeneration(Glm4vForConditionalGeneration):
    """Same interface as the dense model; only the decoder layers differ."""

    weight_rules = MOE_RULES

    @staticmethod
    def make_layer(cfg: TextConfig, layer_idx: int) -> nn.Module:
        return Glm4vMoeTextDecoderLayer(cfg, layer_idx)
