"""The engine's continuous batching changes nothing: a batch of 16 mixed requests (text, one
or two images, video; different lengths) gives, token for token, what each request gives alone
and what transformers gives — also with tiny prefill chunks, with prefix-cache hits, with
preemption forced by a small KV cache, and with vision-encoder cache hits.
"""

from __future__ import annotations

from typing import Any

import pytest

from glmv.multimodal.processor import ProcessedPrompt
from glmv.sampling_params import SamplingParams
from tests.helpers import make_engine, run_engine
from tests.parity.conftest import CASES, glmv_prompt

NUM_TOKENS = 12
GREEDY = SamplingParams.greedy(max_tokens=NUM_TOKENS, ignore_eos=True)
VARIANTS = ("glm-4.6v-flash", "glm-4.5v")


def _extra_prompts(processor: Any, photos: list[Any]) -> list[ProcessedPrompt]:
    """12 more requests: short and long text, other questions about the same photos, a
    conversation with history, an image after a long text."""
    def user(*parts: Any) -> dict[str, Any]:
        return {"role": "user", "content": [
            {"type": "image", "image": p} if not isinstance(p, str) else {"type": "text",
                                                                          "text": p}
            for p in parts]}

    long_text = " ".join(f"item {i} is a {('red', 'green', 'blue')[i % 3]} box;"
                         for i in range(60))
    conversations = [
        [user("Hi")],
        [user(long_text + " Which boxes are red?")],
        [user("Name three colours.")],
        [user(photos[0], "Where is this?")],
        [user(photos[1], "Is this a cat? Answer in one word.")],
        [user("Look at this photo carefully.", photos[0])],
        [user(photos[1], photos[0], "Which came first?")],
        [user("What is 2+2?"), {"role": "assistant", "content": "4"}, user("And 3+3?")],
        [user(long_text), {"role": "assistant", "content": "Noted."},
         user(photos[0], "Describe it.")],
        [{"role": "system", "content": "You are terse."}, user(photos[1], "Colour?")],
        [user("Count: one two three four five six seven eight nine ten")],
        [user(photos[0], "And what is in the top left corner?")],
    ]
    return [processor.process_chat(c) for c in conversations]


@pytest.fixture(scope="module", params=VARIANTS)
def batch(request: Any, ours: Any, cases: Any, photos: Any) -> dict[str, Any]:
    processor, model = ours(request.param)
    prompts = [glmv_prompt(processor, cases[c]) for c in CASES]
    prompts += _extra_prompts(processor, photos)
    assert len(prompts) == 16
    alone = [run_engine(make_engine(processor, model), [p], GREEDY)[0].outputs[0].token_ids
             for p in prompts]
    return {"variant": request.param, "processor": processor, "model": model,
            "prompts": prompts, "alone": alone}


def _tokens(outputs: list[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_batch_equals_alone_and_transformers(batch: dict[str, Any], reference: Any,
                                             cases: Any) -> None:
    engine = make_engine(batch["processor"], batch["model"])
    got = _tokens(run_engine(engine, batch["prompts"], GREEDY))
    assert got == batch["alone"]
    ref = reference(batch["variant"])
    for i, case in enumerate(CASES):
        assert got[i] == ref.greedy(cases[case], NUM_TOKENS), case
    assert all(len(t) == NUM_TOKENS for t in got)


def test_small_prefill_chunks(batch: dict[str, Any]) -> None:
    engine = make_engine(batch["processor"], batch["model"], max_num_batched_tokens=37,
                         enable_prefix_caching=False)
    assert _tokens(run_engine(engine, batch["prompts"], GREEDY)) == batch["alone"]
    # 37 tokens a step at most: the prompts (most longer than 37 tokens) were split
    computed = sum(len(p.token_ids) + NUM_TOKENS - 1 for p in batch["prompts"])
    assert engine.num_steps >= computed / 37


def test_prefix_cache_hits(batch: dict[str, Any]) -> None:
    engine = make_engine(batch["processor"], batch["model"])
    run_engine(engine, batch["prompts"], GREEDY, prefix="first")
    again = run_engine(engine, batch["prompts"], GREEDY, prefix="again")
    assert _tokens(again) == batch["alone"]
    block = engine.cache_config.block_size
    for output, prompt in zip(again, batch["prompts"], strict=True):
        # every full block but the one holding the last prompt token is served from the cache
        assert output.num_cached_tokens == (len(prompt.token_ids) - 1) // block * block


def test_preemption_with_a_tiny_kv_cache(batch: dict[str, Any]) -> None:
    processor, model = batch["processor"], batch["model"]
    longest = max(len(p.token_ids) for p in batch["prompts"]) + NUM_TOKENS
    text = model.config.text
    bytes_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4
    blocks = -(-longest // 16) + 2  # one long request fits, the batch does not
    engine = make_engine(processor, model, kv_cache_memory=blocks * 16 * bytes_per_token / 2**30,
                         max_model_len=longest, enable_prefix_caching=False)
    assert engine.runner.cache_spec.num_blocks == blocks
    requests = []
    add = engine.scheduler.add_request

    def spy(request: Any) -> None:
        requests.append(request)
        add(request)

    engine.scheduler.add_request = spy  # type: ignore[method-assign]
    assert _tokens(run_engine(engine, batch["prompts"], GREEDY)) == batch["alone"]
    assert sum(r.num_preemptions for r in requests) > 0


def test_encoder_cache_hits(batch: dict[str, Any], photos: Any) -> None:
    processor, model = batch["processor"], batch["model"]
    engine = make_engine(processor, model)
    image_prompts = [p for p in batch["prompts"] if p.mm_items]
    run_engine(engine, image_prompts, GREEDY, prefix="first")
    encoded = engine.runner.vision.num_encoded_items
    hits = engine.runner.encoder_cache.hits
    # The same photo after a different text: no prefix-cache hit reaches the image, the
    # encoder cache does.
    follow_up = processor.process_chat([{"role": "user", "content": [
        {"type": "text", "text": "A new question entirely."},
        {"type": "image", "image": photos[0]}, {"type": "text", "text": "What is it?"}]}])
    alone = run_engine(make_engine(processor, model), [follow_up], GREEDY)[0]
    out = run_engine(engine, [follow_up], GREEDY, prefix="second")[0]
    assert out.outputs[0].token_ids == alone.outputs[0].token_ids
    assert engine.runner.vision.num_encoded_items == encoded
    assert engine.runner.encoder_cache.hits == hits + 1

