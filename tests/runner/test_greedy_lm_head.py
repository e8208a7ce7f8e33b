"""Greedy steps take their tokens straight from the LM head's product (no [rows, vocab]
logits written and read back) and give the tokens the logits would."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from glmv import kernels
from glmv.layers.embedding import ParallelLMHead
from glmv.layers.linear import pack_linear_weights
from glmv.models.glm4v import Glm4vForConditionalGeneration
from glmv.models.loader import load_model
from glmv.multimodal.processor import MultiModalProcessor
from glmv.runner.executor import ModelExecutor
from glmv.sampling_params import SamplingParams
from tests.helpers import make_engine, run_engine

pytestmark = pytest.mark.skipif(
    kernels.get_ops() is None or not kernels.get_ops().bf16_linear_native(),
    reason="glmv's CPU kernels with AVX-512 products are not available here")


def test_lm_head_greedy_is_the_argmax_of_its_logits() -> None:
    torch.manual_seed(0)
    head = ParallelLMHead(64, 300).to(torch.bfloat16)
    torch.nn.init.normal_(head.weight)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    want = head(x).float().argmax(dim=-1)
    assert not head.chooses_greedy  # plain weights: from the logits
    assert torch.equal(head.greedy(x), want)
    pack_linear_weights(head)
    assert head.chooses_greedy
    assert torch.equal(head.greedy(x), head(x).float().argmax(dim=-1))


def _generate(engine: Any, processor: Any, logprobs: int | None) -> list[list[int]]:
    prompts = [processor.process("Tell me " * n) for n in (1, 4, 9)]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=logprobs)
    return [o.outputs[0].token_ids for o in run_engine(engine, prompts, params)]


def test_greedy_steps_skip_the_logits_and_keep_the_tokens(tiny_checkpoint: Any,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    ckpt = tiny_checkpoint("glm-4.6v-flash")
    processor = MultiModalProcessor.from_pretrained(ckpt)
    model = load_model(ckpt, dtype=torch.bfloat16, progress=False)
    calls = {"greedy": 0, "logits": 0}
    greedy, logits = (Glm4vForConditionalGeneration.greedy_tokens,
                      Glm4vForConditionalGeneration.compute_logits)

    def counted_greedy(self: Any, hidden: torch.Tensor) -> torch.Tensor:
        calls["greedy"] += 1
        return greedy(self, hidden)

    def counted_logits(self: Any, hidden: torch.Tensor) -> torch.Tensor:
        calls["logits"] += 1
        return logits(self, hidden)

    monkeypatch.setattr(Glm4vForConditionalGeneration, "greedy_tokens", counted_greedy)
    monkeypatch.setattr(Glm4vForConditionalGeneration, "compute_logits", counted_logits)
    engine = make_engine(processor, model)
    fast = _generate(engine, processor, logprobs=None)
    assert calls == {"greedy": 5, "logits": 0}  # one prefill step, four decode steps
    with_logprobs = _generate(engine, processor, logprobs=2)  # needs the logits
    assert calls == {"greedy": 5, "logits": 5}
    monkeypatch.setattr(ModelExecutor, "greedy_without_logits", property(lambda self: False))
    assert _generate(engine, processor, logprobs=None) == fast == with_logprobs
    assert calls == {"greedy": 5, "logits": 10}
