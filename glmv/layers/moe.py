"""Mixture of experts of the GLM-4.5-Air decoder (DeepSeek-V3 style routing).

Routing (float32): s = sigmoid(h W_gate^T); experts are *chosen* by s + e_score_correction_bias
(after keeping the best `topk_group` of `n_group` groups, each group scored by the sum of its
two best biased scores) but *weighted* by the unbiased s, renormalised and scaled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmv.config import MoEConfig
from glmv.distributed.parallel_state import TPGroup, get_tp_group
from glmv.layers.activation import silu_and_mul
from glmv.layers.linear import copy_checked, narrowed


class TopkRouter(nn.Module):
    """Chooses `num_experts_per_tok` experts per token and their combine weights."""

    def __init__(self, hidden_size: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, hidden_size))
        # Kept in float32 whatever the model dtype, as in the checkpoints.
        self.e_score_correction_bias = nn.Parameter(
            torch.empty(cfg.n_routed_experts, dtype=torch.float32), requires_grad=False
        )

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [N, hidden] -> (weights [N, k] float32, expert ids [N, k] int64)."""
        cfg = self.cfg
        scores = F.linear(h.float(), self.weight.float()).sigmoid()  # [N, E]
        choice = scores + self.e_score_correction_bias
        if cfg.n_group > 1:
            grouped = choice.view(-1, cfg.n_group, cfg.n_routed_experts // cfg.n_group)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # [N, G]
            keep = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0).bool()
            expert_mask = group_mask[:, :, None].expand_as(grouped).reshape_as(choice)
            choice = choice.masked_fill(~expert_mask, float("-inf"))
        ids = torch.topk(choice, k=cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids


class FusedExperts(nn.Module):
    """All routed experts' weights stacked: w13 [E, 2 * I, hidden] (gate; up), w2 [E, hidden, I].

    Over a tensor-parallel group of size T (the tokens are the same on every rank, and the
    ranks' partial outputs are summed): each expert's intermediate width split (I / T per rank),
    or, with expert parallel, whole experts placed on ranks (E / T each: rank r holds experts
    r * E / T onwards and adds nothing for tokens routed elsewhere).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp = tp or get_tp_group()
        self.num_experts = num_experts
        if tp.expert_parallel:
            local_experts = tp.shard(num_experts, "routed experts")
            self.first_expert = tp.rank * local_experts
            self.intermediate_size = intermediate_size
        else:
            local_experts = num_experts
            self.first_expert = 0
            self.intermediate_size = tp.shard(intermediate_size, "the experts' intermediate size")
        self.local_experts = local_experts
        width = self.intermediate_size
        self.w13 = nn.Parameter(torch.empty(local_experts, 2 * width, hidden_size))
        self.w2 = nn.Parameter(torch.empty(local_experts, hidden_size, width))
        # Checkpoints store experts one by one: shard (e, "gate"|"up") of w13, (e, "down") of w2;
        # a rank expects (and keeps) only its own experts.
        local = range(self.first_expert, self.first_expert + local_experts)
        self.w13.weight_loader = self._load_w13  # type: ignore[attr-defined]
        self.w13.shard_ids = tuple(  # type: ignore[attr-defined]
            (e, part) for e in local for part in ("gate", "up"))
        self.w2.weight_loader = self._load_w2  # type: ignore[attr-defined]
        self.w2.shard_ids = tuple((e, "down") for e in local)  # type: ignore[attr-defined]

    def _local(self, expert: int) -> int | None:
        index = expert - self.first_expert
        return index if 0 <= index < self.local_experts else None

    def _slice(self, loaded: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's part of an expert's intermediate width (all of it with expert parallel)."""
        index, parts = (0, 1) if self.tp.expert_parallel else (self.tp.rank, self.tp.size)
        return narrowed(loaded, dim, index, self.intermediate_size, parts)

    def _load_w13(self, param: nn.Parameter, loaded: torch.Tensor, shard: object) -> None:
        assert isinstance(shard, tuple)
        expert, part = shard
        local = self._local(expert)
        if local is None:
            return  # another rank's expert
        offset = 0 if part == "gate" else self.intermediate_size
        copy_checked(param.data[local].narrow(0, offset, self.intermediate_size),
                     self._slice(loaded, 0))

    def _load_w2(self, param: nn.Parameter, loaded: torch.Tensor, shard: object) -> None:
        assert isinstance(shard, tuple)
        local = self._local(shard[0])
        if local is not None:
            copy_checked(param.data[local], self._slice(loaded, 1))

    def forward(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """h: [N, hidden]; weights, ids: [N, k] -> [N, hidden].

        Tokens are grouped by expert so each expert runs one matmul over its tokens.
        """
        out = torch.zeros_like(h)
        num_tokens = ids.shape[0]
        # Assignments sorted by (expert, slot k, token): the reference's row order, so bf16
        # matmuls see the same rows in the same order.
        slot_major = ids.t().flatten()  # [k * N]: all tokens' first choice, then second ...
        order = slot_major.argsort(stable=True)
        counts = torch.bincount(slot_major, minlength=self.num_experts).tolist()
        token_of = order % num_tokens  # token index of each sorted assignment
        weight_of = weights.t().flatten()[order]
        start = 0
        for expert, count in enumerate(counts):
            local = self._local(expert)
            if count == 0 or local is None:
                start += count
                continue
            tokens = token_of[start : start + count]
            x = silu_and_mul(F.linear(h[tokens], self.w13[local]))
            y = F.linear(x, self.w2[local]) * weight_of[start : start + count, None]
            out.index_add_(0, tokens, y.to(out.dtype))
            start += count
        return self.tp.all_reduce(out)
