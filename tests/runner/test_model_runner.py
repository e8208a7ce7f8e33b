"""The runner over the paged KV cache computes what one plain forward computes.

A multimodal prompt prefilled in chunks that cut through the image, with scattered KV blocks,
gives the same next-token logits as the whole prompt at once; decode steps continue it.
"""

from __future__ import annotations

import itertools
from typing import Any

import PIL.Image
import pytest
import torch

from glmv.models.loader import load_model
from glmv.multimodal.processor import MultiModalProcessor, ProcessedPrompt
from glmv.multimodal.rope_index import decode_positions
from glmv.runner.executor import ModelExecutor
from glmv.runner.input_batch import SeqChunk, build_step_inputs, slot_mapping
from glmv.runner.kv_cache import KVCacheSpec
from glmv.runner.model_runner import ModelRunner
from tests.helpers import glmv_logits

BLOCK = 4


@pytest.fixture(scope="module", params=["glm-4.6v-flash", "glm-4.5v"])
def setup(request: Any, tiny_checkpoint: Any) -> tuple[MultiModalProcessor, Any, Any]:
    ckpt = tiny_checkpoint(request.param)
    processor = MultiModalProcessor.from_pretrained(ckpt)
    model = load_model(ckpt, dtype="float32", progress=False)
    image = PIL.Image.new("RGB", (120, 90), (200, 40, 30))
    image.paste((20, 90, 200), (30, 20, 90, 70))
    prompt = processor.process_chat([{"role": "user", "content": [
        {"type": "text", "text": "Look:"}, {"type": "image", "image": image},
        {"type": "text", "text": "what colour?"}]}])
    return processor, model, prompt


def _chunk(prompt: Any, embeds: torch.Tensor, image_id: int, lo: int, hi: int,
           table: list[int]) -> SeqChunk:
    ids = torch.tensor(prompt.token_ids)
    mask = ids[lo:hi] == image_id
    before = int((ids[:lo] == image_id).sum())
    count = int(mask.sum())
    return SeqChunk(prompt.token_ids[lo:hi], prompt.positions[:, lo:hi], lo, table,
                    embeds[before : before + count] if count else None,
                    mask if count else None)


def test_chunked_prefill_and_decode_match_one_forward(setup: Any) -> None:
    _, model, prompt = setup
    image_id = model.config.image_token_id
    item = prompt.mm_items[0]
    full = glmv_logits(model, prompt)  # [L, vocab]
    cache = KVCacheSpec(model.config.text.num_hidden_layers, 64, BLOCK,
                        model.config.text.num_key_value_heads, model.config.text.head_dim,
                        torch.float32)
    runner = ModelRunner(model, cache)
    embeds = runner.encode_vision(item.pixel_values, [item.grid_thw])
    length = len(prompt.token_ids)
    table = list(range(63, 63 - (-(-(length + 2) // BLOCK)), -1))  # scattered, descending
    # cut points inside the image span
    cuts = [0, item.offset + 3, item.offset + item.length - 5, length]
    for lo, hi in itertools.pairwise(cuts):
        logits = runner.execute([_chunk(prompt, embeds, image_id, lo, hi, table)])
        torch.testing.assert_close(logits[0], full[hi - 1], rtol=1e-4, atol=1e-4)
    # two decode steps continue the sequence like one forward over prompt + the new tokens
    tokens = [int(full[-1].argmax())]
    for index in (length, length + 1):
        decode = SeqChunk([tokens[-1]], decode_positions(index, 1, prompt.rope_delta), index,
                          table)
        step = runner.execute([decode])[0]
        positions = torch.cat([prompt.positions,
                               decode_positions(length, index - length + 1, prompt.rope_delta)],
                              dim=1)
        extended = ProcessedPrompt(None, prompt.token_ids + tokens, prompt.mm_items, positions,
                                   prompt.rope_delta)
        torch.testing.assert_close(step, glmv_logits(model, extended)[-1], rtol=1e-4, atol=1e-4)
        tokens.append(int(step.argmax()))
    assert int(decode_positions(length, 1, prompt.rope_delta)[0, 0]) == (
        int(prompt.positions.max()) + 1)


def test_batch_of_two_prompts_equals_each_alone(setup: Any) -> None:
    processor, model, prompt = setup
    text = processor.process_chat([{"role": "user", "content": "Hello there"}])
    cache = KVCacheSpec.for_memory(model.config.text, 16 << 20, BLOCK, torch.float32)
    runner = ModelRunner(model, cache)
    item = prompt.mm_items[0]
    embeds = runner.encode_vision(item.pixel_values, [item.grid_thw])
    n1, n2 = len(prompt.token_ids), len(text.token_ids)
    t1 = list(range(0, -(-n1 // BLOCK)))
    t2 = list(range(len(t1), len(t1) + -(-n2 // BLOCK)))
    both = runner.execute([
        _chunk(prompt, embeds, model.config.image_token_id, 0, n1, t1),
        SeqChunk(text.token_ids, text.positions, 0, t2),
    ])
    torch.testing.assert_close(both[0], glmv_logits(model, prompt)[-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[1], glmv_logits(model, text)[-1], rtol=1e-4, atol=1e-4)


def test_step_inputs_layout() -> None:
    chunks = [SeqChunk([5, 6, 7], torch.zeros(3, 3, dtype=torch.long), 2, [9, 4]),
              SeqChunk([8], torch.ones(3, 1, dtype=torch.long), 0, [1])]
    step = build_step_inputs(chunks, BLOCK, "cpu")
    assert step.input_ids.tolist() == [5, 6, 7, 8]
    assert slot_mapping(chunks[0], BLOCK) == [9 * 4 + 2, 9 * 4 + 3, 4 * 4 + 0]
    assert step.meta.slot_mapping is not None
    assert step.meta.slot_mapping.tolist() == [38, 39, 16, 4]
    assert step.meta.query_start_loc == [0, 3, 4]
    assert step.meta.seq_lens == [5, 1]
    assert step.meta.block_tables is not None
    assert step.meta.block_tables.tolist() == [[9, 4], [1, 0]]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("variant", ["glm-4.6v-flash", "glm-4.5v"])
def test_last_layer_computes_only_the_sampled_rows(tiny_checkpoint: Any, variant: str,
                                                   dtype: str) -> None:
    """`last_of`: the last layer past its keys and values runs for the wanted rows only; those
    rows match the whole forward's, and every token's keys and values are cached the same
    (bit for bit: every layer's keys and values come from the same products)."""
    ckpt = tiny_checkpoint(variant)
    model = load_model(ckpt, dtype=dtype, progress=False)
    processor = MultiModalProcessor.from_pretrained(ckpt)
    first = processor.process_chat([{"role": "user", "content": "Hello there, how are you?"}])
    second = processor.process_chat([{"role": "user", "content": "Name three colours"}])
    cfg = model.config.text
    executor = ModelExecutor(model, KVCacheSpec(cfg.num_hidden_layers, 32, BLOCK,
                                                cfg.num_key_value_heads, cfg.head_dim,
                                                getattr(torch, dtype)), "cpu")
    n1, n2 = len(first.token_ids), len(second.token_ids)
    t1 = list(range(-(-n1 // BLOCK)))
    t2 = list(range(len(t1), len(t1) + -(-n2 // BLOCK)))
    cut = n2 // 2

    def chunk(prompt: ProcessedPrompt, lo: int, hi: int, table: list[int]) -> SeqChunk:
        return SeqChunk(prompt.token_ids[lo:hi], prompt.positions[:, lo:hi], lo, table)

    # step 1: the second prompt's first half (no row wanted); step 2: the first prompt whole
    # and the second's rest (both rows wanted, in the other order)
    steps = [([chunk(second, 0, cut, t2)], []),
             ([chunk(first, 0, n1, t1), chunk(second, cut, n2, t2)], [1, 0])]

    def run(last_of: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        for cache in executor.kv_caches:
            cache.zero_()
        outs = []
        with torch.inference_mode():
            for chunks, wanted in steps:
                step = build_step_inputs(chunks, BLOCK, "cpu")
                embeds = model.embed_tokens(step.input_ids)
                if last_of:
                    out = model(embeds, step.positions, step.meta, last_of=wanted)
                    assert out.shape == (len(wanted), cfg.hidden_size)
                else:
                    hidden = model(embeds, step.positions, step.meta)
                    out = hidden[[step.meta.query_start_loc[i + 1] - 1 for i in wanted]]
                outs.append(out)
        return outs, [cache.clone() for cache in executor.kv_caches]

    whole, whole_caches = run(last_of=False)
    rows, caches = run(last_of=True)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for got, want in zip(rows, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for got, want in zip(caches, whole_caches, strict=True):
        assert torch.equal(got, want)
