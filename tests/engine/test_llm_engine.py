"""LLMEngine behaviour on a tiny random model: stopping, seeds, n > 1, logprobs, the thinking
budget, aborts, bad input and a failing step — each without disturbing other requests."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pytest
import torch

from glmv.engine.outputs import RequestOutput
from glmv.errors import PromptError, SamplingParamsError
from glmv.models.loader import load_model
from glmv.multimodal.processor import MultiModalProcessor, ProcessedPrompt
from glmv.sampling_params import SamplingParams
from tests.helpers import glmv_logits, make_engine, run_engine


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint: Any) -> tuple[MultiModalProcessor, Any]:
    ckpt = tiny_checkpoint("glm-4.6v-flash")
    return MultiModalProcessor.from_pretrained(ckpt), load_model(ckpt, dtype="float32",
                                                                 progress=False)


@pytest.fixture
def engine(loaded: tuple[MultiModalProcessor, Any]) -> Any:
    return make_engine(*loaded, max_model_len=256)


def chat(processor: MultiModalProcessor, text: str) -> ProcessedPrompt:
    return processor.process_chat([{"role": "user", "content": text}])


def only(engine: Any, prompt: ProcessedPrompt, params: SamplingParams) -> Any:
    return run_engine(engine, [prompt], params)[0].outputs[0]


def assert_all_blocks_free(engine: Any) -> None:
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.has_unfinished_requests()


def test_stop_token_ids_and_max_tokens(engine: Any, loaded: Any) -> None:
    prompt = chat(loaded[0], "Say something.")
    free = only(engine, prompt, SamplingParams.greedy(max_tokens=10, ignore_eos=True))
    assert (len(free.token_ids), free.finish_reason, free.stop_reason) == (10, "length", None)
    stop_id = free.token_ids[3]
    first = free.token_ids.index(stop_id)
    stopped = only(engine, prompt, SamplingParams.greedy(max_tokens=10, ignore_eos=True,
                                                         stop_token_ids=[stop_id]))
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_id)
    # min_tokens masks the stop id until enough tokens exist
    late = only(engine, prompt, SamplingParams.greedy(max_tokens=10, ignore_eos=True,
                                                      stop_token_ids=[stop_id],
                                                      min_tokens=first + 2))
    assert len(late.token_ids) > first + 1 and stop_id not in late.token_ids[: first + 2]
    assert_all_blocks_free(engine)


def test_a_stop_token_ends_the_text_without_being_in_it(engine: Any, loaded: Any) -> None:
    # vLLM's rule: the stop token is in token_ids but not in the text, unless
    # include_stop_str_in_output asks for it.
    processor, _ = loaded
    tok = processor.tokenizer
    prompt = chat(processor, "Say something.")
    free = only(engine, prompt, SamplingParams.greedy(max_tokens=10, ignore_eos=True,
                                                      skip_special_tokens=False))
    stop_id = free.token_ids[4]
    upto = free.token_ids[: free.token_ids.index(stop_id) + 1]
    for include in (False, True):
        out = only(engine, prompt, SamplingParams.greedy(
            max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id], skip_special_tokens=False,
            include_stop_str_in_output=include))
        assert out.token_ids == upto
        text_ids = upto if include else upto[:-1]
        assert out.text == tok.decode(text_ids, skip_special_tokens=False)


def test_model_eos_stops_unless_ignored(engine: Any, loaded: Any) -> None:
    processor, _ = loaded
    eos = processor.config.eos_token_ids[0]
    prompt = chat(processor, "Hello")
    free = only(engine, prompt, SamplingParams.greedy(max_tokens=6, ignore_eos=True))
    # Make the model's first greedy token its eos: the request stops at once.
    engine.config = dataclasses.replace(engine.config, eos_token_ids=(free.token_ids[0], eos))
    stopped = only(engine, prompt, SamplingParams.greedy(max_tokens=6))
    assert (stopped.token_ids, stopped.finish_reason, stopped.stop_reason) == (
        free.token_ids[:1], "stop", None)
    ignored = only(engine, prompt, SamplingParams.greedy(max_tokens=6, ignore_eos=True))
    assert ignored.token_ids == free.token_ids


def test_stop_strings_cut_the_text(engine: Any, loaded: Any) -> None:
    processor, _ = loaded
    prompt = chat(processor, "Write.")
    free = only(engine, prompt, SamplingParams.greedy(max_tokens=16, ignore_eos=True))
    text = free.text
    assert len(text) > 6
    stop = text[3:6]  # may well straddle two tokens
    cut = only(engine, prompt, SamplingParams.greedy(max_tokens=16, ignore_eos=True, stop=stop))
    assert cut.text == text[: text.index(stop)]
    assert (cut.finish_reason, cut.stop_reason) == ("stop", stop)
    kept = only(engine, prompt, SamplingParams.greedy(max_tokens=16, ignore_eos=True,
                                                      stop=[stop],
                                                      include_stop_str_in_output=True))
    assert kept.text == text[: text.index(stop) + len(stop)]
    assert_all_blocks_free(engine)


def test_streamed_deltas_add_up(engine: Any, loaded: Any) -> None:
    prompt = chat(loaded[0], "Stream this.")
    engine.add_request("s", prompt, SamplingParams.greedy(max_tokens=12, ignore_eos=True))
    text, ids = "", []
    final: RequestOutput | None = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            text += output.outputs[0].delta_text
            ids += output.outputs[0].delta_token_ids
            final = output
    assert final is not None and final.finished
    assert (text, ids) == (final.outputs[0].text, final.outputs[0].token_ids)


def test_final_only_requests_report_once_with_the_same_result(engine: Any,
                                                              loaded: Any) -> None:
    prompt = chat(loaded[0], "Stream this.")
    params = SamplingParams.greedy(max_tokens=12, ignore_eos=True, n=2, seed=3)
    engine.add_request("steps", prompt, params)
    engine.add_request("final", prompt, params, final_only=True)
    seen: dict[str, list[RequestOutput]] = {"steps": [], "final": []}
    started, step_ends = time.monotonic(), []
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen[output.request_id].append(output)
        step_ends.append(time.monotonic())
    assert len(seen["steps"]) >= 12
    [final] = seen["final"]
    streamed = seen["steps"][-1]
    assert final.finished and streamed.finished
    for got, want in zip(final.outputs, streamed.outputs, strict=True):
        assert (got.token_ids, got.text, got.finish_reason) == (
            want.token_ids, want.text, want.finish_reason)
        # The one output's delta is everything, as the sum of the per-step deltas would be.
        assert (got.delta_token_ids, got.delta_text) == (got.token_ids, got.text)
    # Its first token's time is within the first step (both prefilled in it), not the end.
    assert final.first_token_time is not None
    assert started < final.first_token_time <= step_ends[0] < step_ends[-1]
    assert seen["steps"][0].first_token_time is not None
    assert_all_blocks_free(engine)


def test_seed_gives_the_same_tokens_alone_or_in_a_batch(engine: Any, loaded: Any) -> None:
    processor, _ = loaded
    prompts = [chat(processor, f"Story number {i}.") for i in range(5)]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=12,
                            ignore_eos=True)
    alone = only(engine, prompts[2], seeded).token_ids
    mixed = [SamplingParams(temperature=1.0, max_tokens=5 + i, ignore_eos=True)
             for i in range(5)]
    ids = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"m{i}", prompt, seeded if i == 2 else mixed[i])
        ids.append(f"m{i}")
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done["m2"].outputs[0].token_ids == alone
    other_seed = only(engine, prompts[2], SamplingParams(temperature=0.9, top_p=0.95, seed=99,
                                                         max_tokens=12, ignore_eos=True))
    assert other_seed.token_ids != alone


def test_n_completions_share_the_prompt_blocks(engine: Any, loaded: Any) -> None:
    processor, _ = loaded
    prompt = chat(processor, "A prompt long enough to fill several KV blocks " * 4)
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
    engine.add_request("n", prompt, params)
    shared_seen = False
    final = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        children = [engine.scheduler.get_request(f"n-{i}") for i in range(3)]
        if all(c is not None and c.num_computed_tokens > 0 for c in children):
            tables = [engine.block_manager.block_table(f"n-{i}") for i in range(3)]
            full = (len(prompt.token_ids) - 1) // engine.cache_config.block_size
            assert tables[0][:full] == tables[1][:full] == tables[2][:full]
            assert all(engine.block_manager.blocks[b].ref_cnt == 3 for b in tables[0][:full])
            shared_seen = True
        final = next((o for o in outputs if o.finished), final)
    assert shared_seen and final is not None
    assert [c.index for c in final.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in final.outputs)
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1  # seeds 7, 8, 9
    # completion i is reproducible on its own with seed 7 + i
    second = only(engine, prompt, SamplingParams(temperature=1.0, seed=8, max_tokens=6,
                                                 ignore_eos=True))
    assert second.token_ids == final.outputs[1].token_ids
    assert_all_blocks_free(engine)


def test_logprobs_match_the_model(engine: Any, loaded: Any) -> None:
    processor, model = loaded
    prompt = chat(processor, "Logprobs please.")
    out = only(engine, prompt, SamplingParams.greedy(max_tokens=1, logprobs=3))
    assert out.logprobs is not None and len(out.logprobs) == 1
    position = out.logprobs[0]
    want = torch.log_softmax(glmv_logits(model, prompt)[-1], dim=-1)
    top = torch.topk(want, 3)
    assert next(iter(position)) == out.token_ids[0] == int(top.indices[0])
    assert set(position) == set(top.indices.tolist())
    for token_id, logprob in position.items():
        assert logprob.logprob == pytest.approx(float(want[token_id]), abs=1e-4)
    assert sorted(lp.rank for lp in position.values()) == [1, 2, 3]
    assert out.cumulative_logprob == pytest.approx(position[out.token_ids[0]].logprob)


def test_thinking_budget_closes_the_span(engine: Any, loaded: Any) -> None:
    processor, _ = loaded
    special = processor.tokenizer.special
    # A prompt that ends inside an open <think>: the budget counts from there.
    ids = [*chat(processor, "Think briefly.").token_ids, special.think]
    prompt = processor.process_token_ids(ids)
    out = only(engine, prompt, SamplingParams.greedy(max_tokens=12, ignore_eos=True,
                                                     thinking_budget=4))
    tokens = out.token_ids
    close = tokens.index(special.end_think)
    assert close in (4, 5)  # after 4 reasoning tokens: "\n" (unless already there), </think>
    assert tokens[close - 1] == special.newline
    unbounded = only(engine, prompt, SamplingParams.greedy(max_tokens=12, ignore_eos=True))
    assert unbounded.token_ids[:4] == tokens[:4]


def test_abort_at_any_point_frees_everything(loaded: Any) -> None:
    processor, _ = loaded
    engine = make_engine(*loaded, max_model_len=256, max_num_batched_tokens=64)
    long_prompt = chat(processor, "long " * 60)
    assert 64 < len(long_prompt.token_ids) < 200  # prefilled over several steps
    params = SamplingParams.greedy(max_tokens=50, ignore_eos=True)
    engine.add_request("waiting", long_prompt, params)
    engine.abort_request("waiting")  # before any step
    engine.add_request("a", long_prompt, params)
    engine.add_request("b", chat(processor, "short"), params)
    engine.step()
    engine.abort_request(["a", "unknown-id"])  # mid-prefill (or just after)
    for _ in range(3):
        engine.step()
    engine.abort_request("b")  # mid-decode
    assert_all_blocks_free(engine)
    assert engine.step() == []


def test_bad_requests_raise_typed_errors_and_spare_the_others(engine: Any,
                                                              loaded: Any) -> None:
    processor, _ = loaded
    params = SamplingParams.greedy(max_tokens=8, ignore_eos=True)
    good = chat(processor, "Fine request.")
    want = only(engine, good, params).token_ids
    engine.add_request("good", good, params)
    engine.step()
    too_long = processor.process_token_ids(list(range(300)))
    with pytest.raises(PromptError, match=r"300 tokens .* max_model_len is 256"):
        engine.add_request("long", too_long, params)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        engine.add_request("vocab", processor.process_token_ids([10**9]), params)
    with pytest.raises(SamplingParamsError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(SamplingParamsError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    assert final is not None and final.outputs[0].token_ids == want


def test_a_failing_step_fails_only_its_requests(engine: Any, loaded: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    processor, _ = loaded
    params = SamplingParams.greedy(max_tokens=4, ignore_eos=True)
    prompt = chat(processor, "Will fail.")
    want = only(engine, prompt, params).token_ids
    real = engine.runner.execute_step
    calls = {"n": 0}

    def flaky(work: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(work)

    monkeypatch.setattr(engine.runner, "execute_step", flaky)
    engine.add_request("doomed", prompt, params)
    outputs = engine.step()
    assert [o.outputs[0].finish_reason for o in outputs] == ["error"]
    assert "injected fault" in (outputs[0].outputs[0].error or "")
    assert_all_blocks_free(engine)
    # the engine goes on, and the failed prefill left no bad prefix-cache entry behind
    assert only(engine, prompt, params).token_ids == want
