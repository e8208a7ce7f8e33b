"""Token sampling for a batch of requests, in vLLM v1's order and with its semantics.

    logits [R, V] (raw) ------------------------------> logprobs of the chosen + top tokens
      |- penalties (only rows that have them), min_tokens mask (stop ids -> -inf)
      |- greedy rows: argmax
      '- sampled rows: / temperature -> min_p -> top_k -> top_p -> inverse-CDF draw

Sampling draws one uniform number per row and step (inverse CDF) instead of a full-vocabulary
exponential race: on CPU that is ~10x cheaper, and a seeded row consumes exactly one draw of its
own generator per step, so it gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from glmv.engine.outputs import Logprob, PositionLogprobs
from glmv.kernels import cpu_ops
from glmv.sampling_params import SamplingParams

#: Temperatures below this sample greedily (vLLM's epsilon): dividing by them overflows.
GREEDY_EPS = 1e-5
#: How many of the most likely tokens top-p looks at before falling back to a full sort; the
#: nucleus of a trained model almost always fits, a random-weight model's rarely does.
NUM_TOP_P_CANDIDATES = 1024


@dataclass
class SamplingRow:
    """One row of the logits to sample from: a request's settings and history."""

    params: SamplingParams
    generator: torch.Generator | None  # per-request, seeded from params.seed; None = global RNG
    prompt_token_ids: Sequence[int]  # for repetition_penalty (prompt + output tokens count)
    output_token_ids: Sequence[int]  # for presence/frequency penalties and min_tokens
    # Masked (-inf) while len(output_token_ids) < params.min_tokens: the model's eos ids (unless
    # ignore_eos) + params.stop_token_ids.
    stop_token_ids: tuple[int, ...]
    forced_token: int | None = None  # when set, this is the sampled token (thinking budget)

    @property
    def is_greedy(self) -> bool:
        return self.params.temperature < GREEDY_EPS

    @property
    def masks_stop_ids(self) -> bool:
        return bool(self.stop_token_ids) and len(self.output_token_ids) < self.params.min_tokens

    @property
    def edits_logits(self) -> bool:
        """Penalties or the min_tokens mask change this row's logits before choosing."""
        return self.params.has_penalties or self.masks_stop_ids


def needs_only_argmax(rows: Sequence[SamplingRow]) -> bool:
    """Whether every row's token is the argmax of its raw logits (greedy, no penalties or
    min_tokens mask, no logprobs) or forced: then the logits themselves are never needed."""
    return all(row.params.logprobs is None
               and (row.forced_token is not None or (row.is_greedy and not row.edits_logits))
               for row in rows)


@dataclass
class SamplerOutput:
    """The chosen token of every row, and its logprobs where the row's request asked."""

    token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # per row; None unless params.logprobs is not None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator seeded with `seed` on `device`, or None (use the global RNG) without a seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    # manual_seed takes 64-bit values only; any Python int maps onto one (negatives included).
    generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


class Sampler:
    """Chooses one token per row of a logits batch (the generators live in the rows).

    The caller's logits are never modified: rows that need edits are copied into a scratch
    buffer the sampler keeps between steps (fresh 40 MB allocations cost page faults each step).
    """

    def __init__(self) -> None:
        self._scratch: torch.Tensor | None = None  # [>= rows, V], grown on demand

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> SamplerOutput:
        """logits [R, vocab] (any float dtype), one row per entry of `rows` -> R token ids
        (+ logprobs). Work is done in float32 (torch's bf16 argmax is ~5x slower on CPU than
        converting first), except for an all-greedy batch of bf16 CPU logits without logprobs:
        the CPU kernel takes its argmax from the bf16 rows (the same indices, no conversion)."""
        num_rows = len(rows)
        assert logits.dim() == 2 and logits.shape[0] == num_rows, (logits.shape, num_rows)
        plain_greedy: list[int] = []  # argmax of the raw row
        edited_greedy: list[int] = []
        sampled: list[int] = []
        for i, row in enumerate(rows):
            if row.forced_token is not None:
                continue
            if not row.is_greedy:
                sampled.append(i)
            else:
                (edited_greedy if row.edits_logits else plain_greedy).append(i)
        num_asking = sum(r.params.logprobs is not None for r in rows)
        ops = cpu_ops(logits)
        if len(plain_greedy) == num_rows and not num_asking and ops is not None:
            # all greedy, no logprobs: the kernel's argmax of the bf16 rows (the same index)
            return SamplerOutput(ops.argmax_rows(logits).tolist(), [None] * num_rows)
        logits = logits.float()  # no-op for float32

        if len(plain_greedy) == num_rows:  # the common case: one argmax, one transfer
            token_ids: list[int] = logits.argmax(dim=-1).tolist()
        else:
            token_ids = [0] * num_rows
            if plain_greedy:
                picked = _rows_of(logits, plain_greedy).argmax(dim=-1).tolist()
                _scatter(token_ids, plain_greedy, picked)
            # Sampled rows first, whole-vocabulary ones leading, so each group is a slice.
            sampled.sort(key=lambda i: _is_truncated(rows[i]))
            work = sampled + edited_greedy
            if work:
                buffer = self._workspace(len(work), logits)
                torch.index_select(logits, 0, _index(work, logits), out=buffer)
                picked = _choose_edited(buffer, [rows[i] for i in work], len(sampled))
                _scatter(token_ids, work, picked)
            for i, row in enumerate(rows):
                if row.forced_token is not None:
                    token_ids[i] = row.forced_token
        scratch = self._workspace(num_asking, logits) if num_asking else None
        return SamplerOutput(token_ids, compute_logprobs(logits, rows, token_ids, scratch))

    def _workspace(self, num_rows: int, like: torch.Tensor) -> torch.Tensor:
        """A [num_rows, V] slice of the scratch buffer, matching `like`'s vocab and device."""
        scratch = self._scratch
        if (scratch is None or scratch.shape[0] < num_rows or scratch.shape[1] != like.shape[1]
                or scratch.device != like.device or scratch.dtype != like.dtype):
            rows = max(num_rows, scratch.shape[0] if scratch is not None else 0)
            scratch = self._scratch = torch.empty(rows, like.shape[1], dtype=like.dtype,
                                                  device=like.device)
        return scratch[:num_rows]


def _choose_edited(work: torch.Tensor, rows: Sequence[SamplingRow], num_sampled: int) -> list[int]:
    """Tokens of rows that get penalties/masks or are sampled (the first `num_sampled`).

    work [N, V]: the rows' logits, ours to edit in place.
    """
    apply_penalties(work, rows)
    apply_min_tokens(work, rows)
    out: list[int] = []
    if num_sampled:
        out += sample(work[:num_sampled], rows[:num_sampled])
    if num_sampled < len(rows):
        out += work[num_sampled:].argmax(dim=-1).tolist()
    return out


# ----------------------------------------------------------------------------- logit edits


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition, frequency and presence penalties, in place on the rows that have them.

    logits [N, V] align with `rows`. In vLLM's order: repetition (HF style: positive logits
    divided, negative multiplied) on tokens in prompt or output, then frequency x count and
    presence (once) subtracted for tokens in the output. Returns `logits`.
    """
    vocab_size = logits.shape[1]
    for i, row in enumerate(rows):
        params = row.params
        if not params.has_penalties:
            continue
        output = _ids(row.output_token_ids, logits.device, vocab_size)  # [num_output]
        if params.repetition_penalty != 1:
            prompt = _ids(row.prompt_token_ids, logits.device, vocab_size)
            seen = torch.unique(torch.cat([prompt, output]))  # [num_seen]
            values = logits[i, seen]
            penalty = params.repetition_penalty
            logits[i, seen] = torch.where(values > 0, values / penalty, values * penalty)
        if (params.frequency_penalty != 0 or params.presence_penalty != 0) and output.numel():
            seen, counts = torch.unique(output, return_counts=True)
            amount = params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
            logits[i, seen] -= amount
    return logits


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Stop ids -> -inf on rows that have fewer than min_tokens output tokens. In place."""
    vocab_size = logits.shape[1]
    for i, row in enumerate(rows):
        if row.masks_stop_ids:
            logits[i, _ids(row.stop_token_ids, logits.device, vocab_size)] = -math.inf
    return logits


def apply_min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Zero the tokens whose probability is below min_p x the top one. In place.

    probs [S, V], unnormalised (temperature applied); min_p [S] (0 = off).
    """
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [S, 1]
    return probs.masked_fill_(probs < threshold, 0.0)


def top_k_top_p_candidates(
    probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, num_candidates: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's most likely tokens after top-k, then top-p, as a small distribution.

    probs [T, V] unnormalised (temperature and min_p applied); top_k [T] (0 = off); top_p [T]
    (1 = off). Tokens are ranked by probability, ties by lower id, so the kept set and its
    order never depend on the batch: top-k keeps exactly k tokens; top-p, relative to the
    top-k survivors (vLLM) or to the whole vocabulary without top-k, keeps the smallest prefix
    whose mass reaches top_p. Returns (cand [T, K], token_ids [T, K], complete [T]): the
    candidates in rank order, normalised, zero outside the kept set. `complete[t]` is False
    when row t's kept set may reach past the K candidates (its nucleus is larger, or its last
    kept token ties one outside): redo it with num_candidates = V, which is always complete.
    """
    vocab_size = probs.shape[1]
    has_k = top_k > 0  # [T]
    all_k = bool(has_k.all())
    wanted = int(top_k.max()) if all_k else max(int(top_k.max()), num_candidates)
    # One more, to see a tie with the last kept token; num_candidates >= V: the whole sort.
    num = vocab_size if num_candidates >= vocab_size else min(vocab_size, wanted + 1)
    values, token_ids = _ranked_top(probs, num)  # [T, K]
    position = torch.arange(num, device=probs.device)
    in_top_k = ~has_k.unsqueeze(1) | (position.unsqueeze(0) < top_k.unsqueeze(1))  # [T, K]
    kept_values = values.masked_fill(~in_top_k, 0.0)
    # Masses come from running sums only (sequential, so a prefix sums the same whatever K
    # is): a draw cannot depend on how many candidates the batch made us look at.
    mass = kept_values.cumsum(dim=-1)  # [T, K], unnormalised
    norm = mass[:, -1]  # [T]: the top-k rows' normaliser
    if not all_k:  # the others are normalised over the whole vocabulary
        norm = torch.where(has_k, norm, probs.sum(dim=-1))
    mass_before = torch.nn.functional.pad(mass[:, :-1], (1, 0))  # [T, K]
    # Keep a token when the mass before it is below top_p: the smallest prefix reaching top_p,
    # never empty. top_p = 1 keeps all even when rounding makes the mass exceed 1.
    threshold = (top_p * norm).unsqueeze(1)  # [T, 1]
    keep = in_top_k & ((mass_before < threshold) | (top_p >= 1).unsqueeze(1))
    # The top token always: a top_p that is > 0 as a Python float but rounds to 0 here (1e-320
    # in float32) would otherwise leave nothing to draw from.
    keep[:, 0] = True
    last_kept = values.gather(1, keep.sum(dim=-1, keepdim=True) - 1).squeeze(1)  # [T]
    fits = has_k | (mass[:, -1] >= threshold.squeeze(1))
    # A kept zero (min_p dropped it) means every token that can be drawn was seen.
    seen_ties = (last_kept > values[:, -1]) | (last_kept == 0)
    complete = (fits & seen_ties) | (num == vocab_size)
    cand = kept_values.mul_(keep).div_(norm.unsqueeze(1))
    return cand, token_ids, complete


def _ranked_top(probs: torch.Tensor, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `num` most likely tokens of each row of probs [T, V], by probability descending
    and ties by ascending id (torch.topk orders ties arbitrarily) -> (values, ids) [T, num]."""
    if num == probs.shape[1]:
        return probs.sort(dim=-1, descending=True, stable=True)  # stable: ties by id
    values, token_ids = probs.topk(num, dim=-1)
    token_ids, order = token_ids.sort(dim=-1)
    values, order = values.gather(1, order).sort(dim=-1, descending=True, stable=True)
    return values, token_ids.gather(1, order)


# ----------------------------------------------------------------------------- sampling


def sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
    """Sample one token per row of logits [S, V] (penalties applied already; modified in place).

    Fastest when the rows without top-k/top-p come first (each group is then a slice).
    """
    device = logits.device
    # One uniform number per row and step, drawn before anything else: a seeded row's
    # generator then advances the same way whichever path below serves it.
    uniform = _uniforms([r.generator for r in rows], device)  # [S, 1]
    temperature = torch.tensor([r.params.temperature for r in rows], device=device)
    logits.div_(temperature.unsqueeze(1))
    # Unnormalised probabilities in place: the top token of each row gets 1.
    probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()  # [S, V]
    if any(r.params.min_p > 0 for r in rows):
        apply_min_p(probs, torch.tensor([r.params.min_p for r in rows], device=device))
    is_truncated = [_is_truncated(r) for r in rows]
    whole = [p for p, t in enumerate(is_truncated) if not t]
    truncated = [p for p, t in enumerate(is_truncated) if t]
    out = [0] * len(rows)
    if whole:
        picked = _draw(_rows_of(probs, whole), uniform[_index(whole, probs)], in_place=True)
        _scatter(out, whole, picked.tolist())
    if truncated:
        picked_list = _sample_truncated(_rows_of(probs, truncated), [rows[p] for p in truncated],
                                        uniform[_index(truncated, probs)])
        _scatter(out, truncated, picked_list)
    return out


def _sample_truncated(probs: torch.Tensor, rows: Sequence[SamplingRow],
                      uniform: torch.Tensor) -> list[int]:
    """Draw among each row's top-k / top-p candidates of unnormalised probs [T, V]. Rows whose
    nucleus may not fit in the first NUM_TOP_P_CANDIDATES are redone over the whole sorted
    vocabulary, which keeps the same tokens in the same order: the draw does not depend on
    the largest top_k of the batch."""
    device = probs.device
    top_k = torch.tensor([min(r.params.top_k, probs.shape[1]) for r in rows], device=device)
    top_p = torch.tensor([r.params.top_p for r in rows], device=device)
    cand, token_ids, complete = top_k_top_p_candidates(probs, top_k, top_p,
                                                       NUM_TOP_P_CANDIDATES)
    positions = _draw(cand, uniform, in_place=True)  # [T]
    out: list[int] = token_ids.gather(1, positions.unsqueeze(1)).squeeze(1).tolist()
    redo = [t for t, ok in enumerate(complete.tolist()) if not ok]
    if redo:
        idx = _index(redo, probs)
        sub = probs[idx]  # [F, V]
        cand, token_ids, _ = top_k_top_p_candidates(sub, top_k[idx], top_p[idx], sub.shape[1])
        positions = _draw(cand, uniform[idx], in_place=True)
        _scatter(out, redo, token_ids.gather(1, positions.unsqueeze(1)).squeeze(1).tolist())
    return out


def _uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """[S, 1] uniform numbers in [0, 1): a row's own generator's when it has one, else from a
    single batched draw of the global RNG."""
    uniform = torch.rand(len(generators), 1, device=device)
    for i, generator in enumerate(generators):
        if generator is not None:
            uniform[i] = torch.rand(1, generator=generator, device=generator.device)
    return uniform


def _draw(probs: torch.Tensor, uniform: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """Inverse-CDF draw of one index per row of unnormalised probs [S, K] (>= 0, some > 0)
    with uniform [S, 1] -> positions [S]. in_place turns probs into the CDF."""
    cdf = probs.cumsum_(dim=-1) if in_place else probs.cumsum(dim=-1)  # [S, K]
    total = cdf[:, -1:]  # [S, 1]
    # Strictly below the total, so the search never lands past the last non-zero token.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    positions = torch.searchsorted(cdf, target, right=True).squeeze(1)  # [S]
    return positions.clamp_(max=probs.shape[1] - 1)


# ----------------------------------------------------------------------------- logprobs


def compute_logprobs(logits: torch.Tensor, rows: Sequence[SamplingRow],
                     token_ids: Sequence[int],
                     scratch: torch.Tensor | None = None) -> list[PositionLogprobs | None]:
    """Logprobs of the raw logits [R, V] (before penalties and temperature, vLLM's default).

    Per asking row: the chosen token first, then the top `params.logprobs` tokens in rank
    order; rank = 1 + the number of tokens with a strictly higher logprob. `scratch`: an
    optional [>= asking rows, V] float buffer that spares two large allocations.
    """
    asking = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    out: list[PositionLogprobs | None] = [None] * len(rows)
    if not asking:
        return out
    sub = _rows_of(logits, asking)  # [L, V]
    buffer = torch.empty_like(sub) if scratch is None else scratch[:len(asking)]  # [L, V]
    top = sub.amax(dim=-1, keepdim=True)  # [L, 1]
    torch.sub(sub, top, out=buffer)
    lse = buffer.exp_().sum(dim=-1, keepdim=True).log_().add_(top)  # [L, 1]
    chosen = torch.tensor([token_ids[i] for i in asking], device=logits.device).unsqueeze(1)
    chosen_logit = sub.gather(1, chosen)  # [L, 1]
    higher = torch.gt(sub, chosen_logit, out=buffer).sum(dim=-1)  # [L]
    chosen_rank = (higher + 1).tolist()
    chosen_lp = (chosen_logit - lse).squeeze(1).tolist()
    num_top = max(rows[i].params.logprobs or 0 for i in asking)
    top_lp: list[list[float]] = [[] for _ in asking]
    top_ids: list[list[int]] = [[] for _ in asking]
    top_rank: list[list[int]] = [[] for _ in asking]
    if num_top:
        values, ids = sub.topk(num_top, dim=-1)  # [L, n], sorted descending
        # Ties share a rank: count the strictly higher values among the top ones.
        ranks = (values.unsqueeze(1) > values.unsqueeze(2)).sum(dim=-1) + 1  # [L, n]
        top_lp, top_ids, top_rank = (values - lse).tolist(), ids.tolist(), ranks.tolist()
    for j, i in enumerate(asking):
        entry: PositionLogprobs = {token_ids[i]: Logprob(chosen_lp[j], chosen_rank[j])}
        for k in range(rows[i].params.logprobs or 0):
            entry.setdefault(top_ids[j][k], Logprob(top_lp[j][k], top_rank[j][k]))
        out[i] = entry
    return out


# ----------------------------------------------------------------------------- helpers


def _is_truncated(row: SamplingRow) -> bool:
    return row.params.top_k > 0 or row.params.top_p < 1


def _index(positions: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(positions, dtype=torch.long, device=like.device)


def _rows_of(tensor: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """tensor[positions]: a view when the positions are consecutive, else a copy."""
    first = positions[0]
    if positions == list(range(first, first + len(positions))):
        return tensor[first:first + len(positions)]
    return tensor[_index(positions, tensor)]


def _ids(token_ids: Sequence[int], device: torch.device, vocab_size: int) -> torch.Tensor:
    """Token ids as a tensor, without ids past the logits' vocabulary (they have no logit)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).to(device)
    return ids[ids < vocab_size] if ids.numel() and int(ids.max()) >= vocab_size else ids


def _scatter(out: list[int], positions: Sequence[int], values: Sequence[int]) -> None:
    for position, value in zip(positions, values, strict=True):
        out[position] = value

