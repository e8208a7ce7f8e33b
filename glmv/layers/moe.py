"""Mixture of experts of the GLM-4.5-Air decoder (DeepSeek-V3 style routing).

Routing (float32): s = sigmoid(h W_gate^T); experts are *chosen* by s + e_score_correction_bias
(after keeping the best `topk_group` of `n_group` groups, each group scored by the sum of its
two best biased scores) but *weighted* by the unbiased s, renormalised and scaled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmv.checkpoint import LoadedTensor
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

    Over a tensor-parallel group of size T the tokens are the same on every rank. Either each
    expert's intermediate width is split (I / T per rank) and the ranks' partial outputs are
    summed, or, with expert parallel, whole experts are placed on ranks (E / T each: rank r
    holds experts r * E / T onwards) and the tokens travel to them (see `_dispatched`).
    Either way every rank returns the whole output.
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

    def _slice(self, loaded: LoadedTensor, dim: int) -> LoadedTensor:
        """This rank's part of an expert's intermediate width (all of it with expert parallel)."""
        index, parts = (0, 1) if self.tp.expert_parallel else (self.tp.rank, self.tp.size)
        return narrowed(loaded, dim, index, self.intermediate_size, parts)

    def _load_w13(self, param: nn.Parameter, loaded: LoadedTensor, shard: object) -> None:
        assert isinstance(shard, tuple)
        expert, part = shard
        local = self._local(expert)
        if local is None:
            return  # another rank's expert
        offset = 0 if part == "gate" else self.intermediate_size
        copy_checked(param.data[local].narrow(0, offset, self.intermediate_size),
                     self._slice(loaded, 0))

    def _load_w2(self, param: nn.Parameter, loaded: LoadedTensor, shard: object) -> None:
        assert isinstance(shard, tuple)
        local = self._local(shard[0])
        if local is not None:
            copy_checked(param.data[local], self._slice(loaded, 1))

    def _expert(self, local: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert `local` applied to the rows of x."""
        return F.linear(silu_and_mul(F.linear(x, self.w13[local])), self.w2[local])

    def forward(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """h: [N, hidden]; weights, ids: [N, k] (the same on every rank) -> [N, hidden]."""
        if self.tp.expert_parallel and self.tp.size > 1:
            return self._dispatched(h, weights, ids)
        return self.tp.all_reduce(self._local_sum(h, weights, ids))

    def _local_sum(self, h: torch.Tensor, weights: torch.Tensor,
                   ids: torch.Tensor) -> torch.Tensor:
        """Every token's weighted sum over this rank's experts (its slice of each expert's width).

        Tokens are grouped by expert so each expert runs one matmul over its tokens.
        """
        out = torch.zeros_like(h)
        token_of, weight_of, counts = _by_expert(weights, ids, self.num_experts)
        start = 0
        for expert, count in enumerate(counts.tolist()):
            local = self._local(expert)
            if count == 0 or local is None:
                start += count
                continue
            tokens = token_of[start : start + count]
            y = self._expert(local, h[tokens]) * weight_of[start : start + count, None]
            out.index_add_(0, tokens, y.to(out.dtype))
            start += count
        return out

    def _dispatched(self, h: torch.Tensor, weights: torch.Tensor,
                    ids: torch.Tensor) -> torch.Tensor:
        """Expert parallel: each rank routes a share of the tokens to the experts' owners.

        Rank r takes the r-th of T near-equal contiguous shares of the N tokens (none when
        N < T). Each (token, expert) assignment's hidden row goes to the expert's owner (one
        all-to-all, after one exchanging the counts), which runs its experts over what it got
        and sends the outputs back (a second all-to-all); the token's rank weights and sums
        them, and gathering the shares gives every rank the whole output. Each assignment thus
        crosses the group once each way, instead of every rank running its experts over all
        N tokens and an all-reduce of [N, hidden] partial sums.
        """
        tp, num_tokens = self.tp, h.shape[0]
        shares = [num_tokens // tp.size + (r < num_tokens % tp.size) for r in range(tp.size)]
        begin = sum(shares[: tp.rank])
        mine = slice(begin, begin + shares[tp.rank])
        token_of, weight_of, counts = _by_expert(weights[mine], ids[mine], self.num_experts)
        # counts[e] rows for expert e, sorted by expert, so each owner's rows are contiguous;
        # owner r is sent the counts of its experts, to group what it receives by expert.
        received_counts = tp.all_to_all(counts).view(tp.size, self.local_experts)
        send_sizes = counts.view(tp.size, self.local_experts).sum(1).tolist()
        recv_sizes = received_counts.sum(1).tolist()
        received = tp.all_to_all(h[mine][token_of], send_sizes, recv_sizes)
        outputs = tp.all_to_all(self._run_received(received, received_counts),
                                recv_sizes, send_sizes)
        out = h.new_zeros((shares[tp.rank], h.shape[1]))
        out.index_add_(0, token_of, (outputs * weight_of[:, None]).to(out.dtype))
        return tp.all_gather_rows(out, shares)

    def _run_received(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows from each source rank in turn, each source's sorted by local expert
        (counts[source, expert] rows) -> each row through its expert, in the same order."""
        local_of = torch.arange(self.local_experts, device=x.device).repeat(counts.shape[0])
        order = local_of.repeat_interleave(counts.flatten()).argsort(stable=True)
        out = torch.empty_like(x)
        start = 0
        for local, count in enumerate(counts.sum(0).tolist()):
            if count:
                rows = order[start : start + count]
                out[rows] = self._expert(local, x[rows])
            start += count
        return out


def _by_expert(weights: torch.Tensor, ids: torch.Tensor,
               num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (token, expert) assignments sorted by (expert, slot k, token): each one's token and
    weight, and the number per expert [E].

    The reference's row order, so bf16 matmuls see the same rows in the same order.
    """
    slot_major = ids.t().flatten()  # [k * N]: all tokens' first choice, then second ...
    order = slot_major.argsort(stable=True)
    counts = torch.bincount(slot_major, minlength=num_experts)
    return order % ids.shape[0], weights.t().flatten()[order], counts
