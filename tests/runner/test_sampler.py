"""Sampler: each setting changes the distribution exactly as vLLM's does; seeded rows are
reproducible whatever the batch; logprobs are the raw model's."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from glmv.runner import sampler as sampler_module
from glmv.runner.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    make_generator,
    needs_only_argmax,
    top_k_top_p_candidates,
)
from glmv.sampling_params import SamplingParams

# Probabilities 0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005 over 8 tokens, shuffled so
# token order is not rank order.
PROBS = torch.tensor([0.15, 0.4, 0.005, 0.1, 0.25, 0.03, 0.05, 0.015])
LOGITS = PROBS.log() + 3.0  # any shift: softmax(LOGITS) == PROBS
RANKED = [1, 4, 0, 3, 6, 5, 7, 2]  # token ids by probability
NUM_DRAWS = 4000


def row(params: SamplingParams | None = None, *, generator: torch.Generator | None = None,
        prompt: tuple[int, ...] = (), output: tuple[int, ...] = (),
        stop: tuple[int, ...] = (), forced: int | None = None, **kwargs: Any) -> SamplingRow:
    params = params if params is not None else SamplingParams(**kwargs)
    return SamplingRow(params, generator, list(prompt), list(output), stop, forced)


def draw_counts(params: SamplingParams, logits: torch.Tensor = LOGITS,
                num: int = NUM_DRAWS, seed: int = 0) -> torch.Tensor:
    """Token frequencies of `num` unseeded rows sampled in one batch (global RNG seeded)."""
    torch.manual_seed(seed)
    out = Sampler()(logits.expand(num, -1).contiguous(), [row(params)] * num)
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.numel()).float() / num


def assert_frequencies(freq: torch.Tensor, expected: torch.Tensor) -> None:
    # 5 standard deviations of a binomial frequency: a false failure has odds ~1e-6 per token.
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / NUM_DRAWS) + 1e-9
    assert torch.all((freq - expected).abs() <= tolerance), (freq, expected)


def kept(probs: torch.Tensor, params: SamplingParams) -> set[int]:
    """Tokens with a non-zero probability after top-k/top-p, per the candidates function
    (redone over the whole vocabulary when incomplete, as the sampler does)."""
    args = (probs.unsqueeze(0), torch.tensor([params.top_k]), torch.tensor([params.top_p]))
    cand, ids, complete = top_k_top_p_candidates(*args, 4)
    if not bool(complete[0]):
        cand, ids, complete = top_k_top_p_candidates(*args, probs.numel())
    assert bool(complete[0])
    return {int(t) for t, p in zip(ids[0], cand[0], strict=True) if p > 0}


# ----------------------------------------------------------------------------- greedy


def test_greedy_is_argmax_and_skips_all_work() -> None:
    logits = torch.randn(64, 1000)
    sampler = Sampler()
    out = sampler(logits, [row(temperature=0.0)] * 64)
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 64
    assert sampler._scratch is None  # one argmax, no per-row copies


@pytest.mark.parametrize("logprobs", [None, 2])
def test_greedy_on_bf16_logits_picks_what_float_argmax_picks(logprobs: int | None) -> None:
    # bf16 CPU logits take the kernel's argmax unless a row asks for logprobs
    logits = torch.randn(16, 5000, generator=torch.Generator().manual_seed(3)).bfloat16()
    out = Sampler()(logits, [row(temperature=0.0, logprobs=logprobs)] * 16)
    assert out.token_ids == logits.float().argmax(dim=-1).tolist()
    assert (out.logprobs == [None] * 16) == (logprobs is None)


def test_caller_logits_are_not_modified() -> None:
    logits = torch.randn(4, 50)
    before = logits.clone()
    rows = [row(temperature=0.7, top_p=0.5, repetition_penalty=1.3, output=(1, 2)),
            row(temperature=0.0, presence_penalty=1.0, output=(3,)),
            row(temperature=1.0, min_p=0.2, logprobs=3), row(temperature=0.0)]
    Sampler()(logits, rows)
    assert torch.equal(logits, before)


# ----------------------------------------------------------------------------- distribution


def test_plain_sampling_follows_softmax() -> None:
    assert_frequencies(draw_counts(SamplingParams(temperature=1.0)), PROBS)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_sharpens_and_flattens(temperature: float) -> None:
    expected = torch.softmax(LOGITS / temperature, dim=0)
    freq = draw_counts(SamplingParams(temperature=temperature))
    assert_frequencies(freq, expected)
    top = RANKED[0]
    assert (freq[top] > PROBS[top] + 0.1) if temperature < 1 else (freq[top] < PROBS[top] - 0.1)


def test_top_k_keeps_exactly_k_tokens() -> None:
    params = SamplingParams(top_k=3)
    assert kept(PROBS, params) == set(RANKED[:3])
    expected = torch.zeros(8)
    expected[RANKED[:3]] = PROBS[RANKED[:3]] / PROBS[RANKED[:3]].sum()
    assert_frequencies(draw_counts(params), expected)


@pytest.mark.parametrize(("top_p", "size"), [(0.3, 1), (0.6, 2), (0.75, 3), (0.85, 4),
                                             (0.999, 8)])
def test_top_p_keeps_the_smallest_nucleus(top_p: float, size: int) -> None:
    # Masses of the ranked prefix: 0.4, 0.65, 0.8, 0.9, 0.95, 0.98, 0.995, 1.
    params = SamplingParams(top_p=top_p)
    assert kept(PROBS, params) == set(RANKED[:size])
    expected = torch.zeros(8)
    expected[RANKED[:size]] = PROBS[RANKED[:size]] / PROBS[RANKED[:size]].sum()
    assert_frequencies(draw_counts(params), expected)


def test_ties_rank_by_lower_id() -> None:
    probs = torch.tensor([0.1, 0.3, 0.1, 0.3, 0.3, 0.1]) / 1.2
    assert kept(probs[:6], SamplingParams(top_k=2)) == {1, 3}
    _, _, complete = top_k_top_p_candidates(probs.unsqueeze(0), torch.tensor([2]),
                                            torch.tensor([1.0]), 2)
    # Only 2 + 1 candidates were looked at and the last kept one ties the third: not sure
    # the lowest ids were seen, so the row asks for the full sort.
    assert not bool(complete[0])
    freq = draw_counts(SamplingParams(top_k=2), logits=probs.log(), num=500)
    assert {int(t) for t in freq.nonzero()} == {1, 3}


def test_top_p_is_relative_to_top_k_survivors() -> None:
    # After top_k=3 the survivors renormalise to 0.5, 0.3125, 0.1875: two reach 0.75 (over
    # the whole vocabulary, 0.4 + 0.25 would not).
    assert kept(PROBS, SamplingParams(top_p=0.75)) == set(RANKED[:3])
    assert kept(PROBS, SamplingParams(top_k=3, top_p=0.75)) == set(RANKED[:2])
    assert kept(PROBS, SamplingParams(top_k=3, top_p=0.85)) == set(RANKED[:3])
    assert kept(PROBS, SamplingParams(top_k=3, top_p=0.45)) == set(RANKED[:1])


def test_min_p_drops_tokens_below_fraction_of_top() -> None:
    probs = PROBS.clone().unsqueeze(0)
    apply_min_p(probs, torch.tensor([0.3]))  # threshold 0.3 x 0.4 = 0.12
    assert {int(t) for t in probs[0].nonzero()} == set(RANKED[:3])
    expected = torch.zeros(8)
    expected[RANKED[:3]] = PROBS[RANKED[:3]] / PROBS[RANKED[:3]].sum()
    assert_frequencies(draw_counts(SamplingParams(min_p=0.3)), expected)


def test_min_p_below_top_k_needs_no_full_sort() -> None:
    probs = PROBS.clone().unsqueeze(0)
    apply_min_p(probs, torch.tensor([0.3]))  # three tokens left
    cand, ids, complete = top_k_top_p_candidates(probs, torch.tensor([5]), torch.tensor([1.0]),
                                                 1024)
    assert bool(complete[0])
    assert {int(t) for t, p in zip(ids[0], cand[0], strict=True) if p > 0} == set(RANKED[:3])


def test_min_p_applies_after_temperature() -> None:
    # At temperature 2 the probabilities are sqrt-flattened: 0.05 / 0.4 -> sqrt(1/8) = 0.354
    # of the top, so min_p = 0.3 keeps five tokens instead of three.
    freq = draw_counts(SamplingParams(temperature=2.0, min_p=0.3))
    assert {int(t) for t in freq.nonzero()} == set(RANKED[:5])


def test_full_sort_fallback_gives_the_same_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    # With 2 candidates the nucleus of top_p = 0.9 (4 tokens) does not fit: the rows are redone
    # over the sorted vocabulary and must draw exactly what a large candidate set draws.
    params = SamplingParams(top_p=0.9, seed=5)
    _, _, complete = top_k_top_p_candidates(PROBS.unsqueeze(0), torch.tensor([0]),
                                            torch.tensor([0.9]), 2)
    assert not bool(complete[0])
    wide = _seeded_tokens(params, steps=200)
    monkeypatch.setattr(sampler_module, "NUM_TOP_P_CANDIDATES", 2)
    assert _seeded_tokens(params, steps=200) == wide
    assert set(wide) == set(RANKED[:4])


def _seeded_tokens(params: SamplingParams, steps: int) -> list[int]:
    sampler, generator = Sampler(), make_generator(params.seed, "cpu")
    return [sampler(LOGITS.unsqueeze(0), [row(params, generator=generator)]).token_ids[0]
            for _ in range(steps)]


# ----------------------------------------------------------------------------- edits


def test_penalties_change_exactly_the_right_logits_by_the_right_amount() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, -0.5, 3.0, 0.0, 1.0, -2.0]] * 2)
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    rows = [row(params, prompt=(0, 1, 99), output=(2, 2, 3, 100)), row(temperature=1.0)]
    apply_penalties(logits, rows)
    # Repetition on prompt + output tokens 0-3 (ids past the vocabulary ignored); then
    # frequency (x count) and presence (once) on output tokens 2 (twice) and 3.
    expected = [2.0 / 2, -1.0 * 2, 0.5 / 2 - 2 * 0.5 - 0.25, -0.5 * 2 - 0.5 - 0.25,
                3.0, 0.0, 1.0, -2.0]
    assert logits[0].tolist() == pytest.approx(expected)
    assert logits[1].tolist() == [2.0, -1.0, 0.5, -0.5, 3.0, 0.0, 1.0, -2.0]


def test_penalties_steer_greedy_choice() -> None:
    logits = torch.tensor([[1.0, 0.9, 0.0]])
    assert Sampler()(logits, [row(temperature=0.0, output=(0,))]).token_ids == [0]
    for params in (SamplingParams(temperature=0.0, presence_penalty=0.2),
                   SamplingParams(temperature=0.0, frequency_penalty=0.2),
                   SamplingParams(temperature=0.0, repetition_penalty=1.2)):
        out = Sampler()(logits, [row(params, output=(0,))])
        assert out.token_ids == [1], params


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]])  # token 1 (a stop id) is the argmax
    params = SamplingParams(temperature=0.0, min_tokens=2)
    sampler = Sampler()
    for output, want in (((), 2), ((7,), 2), ((7, 7), 1)):
        rows = [row(params, output=output, stop=(1, 3, 10**6))]
        assert sampler(logits, rows).token_ids == [want], output
    sampled = SamplingParams(temperature=1.0, min_tokens=1)
    torch.manual_seed(0)
    out = sampler(logits.expand(500, -1), [row(sampled, stop=(1,))] * 500)
    assert 1 not in out.token_ids


def test_forced_token_overrides_the_choice() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0], [0.0, 5.0, 4.0]])
    rows = [row(temperature=0.0, forced=0, logprobs=1), row(temperature=1.0, forced=2)]
    out = Sampler()(logits, rows)
    assert out.token_ids == [0, 2]
    logprob = out.logprobs[0]
    assert logprob is not None and list(logprob) == [0, 1]
    assert logprob[0].rank == 3


# ----------------------------------------------------------------------------- logprobs


def test_logprobs_are_the_raw_log_softmax_with_ranks() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    raw = torch.log_softmax(logits, dim=-1)
    params = SamplingParams(temperature=0.5, top_k=40, repetition_penalty=1.5, logprobs=5)
    rows = [row(params, prompt=(1, 2, 3)), row(temperature=0.0), row(temperature=0.0, logprobs=0)]
    out = Sampler()(logits, rows)
    chosen = out.token_ids[0]
    entry = out.logprobs[0]
    assert entry is not None and out.logprobs[1] is None
    assert next(iter(entry)) == chosen  # chosen first
    assert entry[chosen].logprob == pytest.approx(float(raw[0, chosen]), abs=1e-5)
    assert entry[chosen].rank == 1 + int((raw[0] > raw[0, chosen]).sum())
    top = raw[0].topk(5)
    top_entries = [(t, lp) for t, lp in entry.items() if lp.rank <= 5]
    assert [t for t, _ in top_entries] == top.indices.tolist()
    for rank, (token, lp) in enumerate(top_entries, start=1):
        assert lp.rank == rank
        assert lp.logprob == pytest.approx(float(raw[0, token]), abs=1e-5)
    only = out.logprobs[2]
    assert only is not None and list(only) == [out.token_ids[2]]
    assert only[out.token_ids[2]].rank == 1


def test_logprob_ranks_share_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    entry = Sampler()(logits, [row(temperature=0.0, logprobs=3, forced=3)]).logprobs[0]
    assert entry is not None
    assert {t: lp.rank for t, lp in entry.items()} == {3: 4, 1: 1, 2: 1, 0: 3}
    assert sum(math.exp(lp.logprob) for t, lp in entry.items()) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- seeds


def _companions(step: int, vocab: int) -> list[tuple[SamplingRow, torch.Tensor]]:
    """Other requests of a batch: greedy, unseeded, other seeds, big top_k, penalties."""
    gen = torch.Generator().manual_seed(1000 + step)
    pool = [
        row(temperature=0.0),
        row(temperature=0.9),
        row(temperature=1.1, top_k=vocab - 3, top_p=0.97),
        row(temperature=0.8, top_p=0.5, min_p=0.05, generator=make_generator(step, "cpu")),
        row(temperature=1.0, repetition_penalty=1.3, output=(1, 2, 3), logprobs=2),
    ]
    return [(r, torch.randn(vocab, generator=gen) * 2) for r in pool[: step % 5 + 1]]


@pytest.mark.parametrize("vocab", [7, 1500, -1500])  # -1500: bf16-rounded, full of ties
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8, seed=42),
    SamplingParams(temperature=1.0, top_p=0.9, seed=42),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.01, seed=42,
                   presence_penalty=0.5),
])
def test_same_seed_same_tokens_in_any_batch(params: SamplingParams, vocab: int) -> None:
    steps = 40
    ties, vocab = vocab < 0, abs(vocab)
    logits = [torch.randn(vocab, generator=torch.Generator().manual_seed(s)) * 2
              for s in range(steps)]
    if ties:
        logits = [t.bfloat16().float() for t in logits]
    alone_gen, batch_gen = make_generator(42, "cpu"), make_generator(42, "cpu")
    sampler = Sampler()
    alone: list[int] = []
    batched: list[int] = []
    for step in range(steps):
        out = sampler(logits[step].unsqueeze(0), [row(params, generator=alone_gen,
                                                      output=tuple(alone))])
        alone.append(out.token_ids[0])
        torch.manual_seed(step)  # unseeded companions use the global RNG differently
        others = _companions(step, vocab)
        position = step % (len(others) + 1)
        ours = row(params, generator=batch_gen, output=tuple(batched))
        entries = [*others[:position], (ours, logits[step]), *others[position:]]
        out = sampler(torch.stack([t for _, t in entries]), [r for r, _ in entries])
        batched.append(out.token_ids[position])
    assert alone == batched
    assert len(set(alone)) > 1  # really sampled


def test_different_seeds_differ() -> None:
    params = SamplingParams(temperature=1.0)
    logits = torch.zeros(1, 1000)
    sampler = Sampler()
    runs = []
    for seed in (1, 2):
        generator = make_generator(seed, "cpu")
        runs.append([sampler(logits, [row(params, generator=generator)]).token_ids[0]
                     for _ in range(20)])
    assert runs[0] != runs[1]


def test_make_generator() -> None:
    assert make_generator(None, "cpu") is None
    for seed in (0, -1, 2**70):
        generator = make_generator(seed, "cpu")
        assert generator is not None and generator.device.type == "cpu"


def test_only_raw_greedy_rows_without_logprobs_skip_the_logits() -> None:
    """The runner takes such steps' tokens from the LM head without logits; anything that
    reads or edits the logits keeps them."""
    greedy = row(temperature=0.0)
    assert needs_only_argmax([greedy, greedy])
    assert needs_only_argmax([greedy, row(temperature=0.7, forced=3)])  # thinking budget
    assert not needs_only_argmax([greedy, row(temperature=0.7)])
    assert not needs_only_argmax([row(temperature=0.0, logprobs=1)])
    assert not needs_only_argmax([row(temperature=0.0, forced=3, logprobs=0)])
    assert not needs_only_argmax([row(temperature=0.0, repetition_penalty=1.2)])
    assert not needs_only_argmax([row(temperature=0.0, min_tokens=2, stop=(5,))])
