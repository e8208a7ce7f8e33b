"""The engine over two ranks (`LLM(tensor_parallel_size=2)`: rank 0 here, rank 1 spawned):
greedy outputs and their logprobs equal one process's for text, image and video prompts run as
one batch, dense and MoE, with expert parallel and the data-parallel vision encoder; the KV
cache holds each rank's KV heads; a worker that dies ends the engine with its reason."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from glmv import LLM, SamplingParams
from glmv.engine.outputs import RequestOutput
from glmv.errors import ConfigError, EngineDeadError
from tests.helpers import write_mp4

SMALL = dict(dtype="float32", kv_cache_memory=0.05, max_model_len=4096, show_progress=False)


def _conversations(tmp_path: Path) -> list[list[dict[str, Any]]]:
    pytest.importorskip("av")
    pixels = (np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
    image = tmp_path / "image.png"
    PIL.Image.fromarray(pixels).save(image)
    video = write_mp4(tmp_path / "clip.mp4")
    return [
        [{"role": "user", "content": "Say something about tensors and their ranks."}],
        [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(image)}},
            {"type": "image_url", "image_url": {"url": str(image)}},
            {"type": "text", "text": "Compare the two pictures."}]}],
        [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": str(video)}},
            {"type": "text", "text": "What happens?"}]}],
    ]


GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3)


def _run(llm: LLM, conversations: list[list[dict[str, Any]]]) -> list[RequestOutput]:
    return llm.chat(conversations, GREEDY, use_tqdm=False)  # type: ignore[arg-type]


@pytest.mark.parametrize("variant, flags", [
    ("glm-4.1v-thinking", {}),
    ("glm-4.5v", {}),
    ("glm-4.5v", {"enable_expert_parallel": True, "mm_encoder_tp_mode": "data"}),
], ids=["dense", "moe", "moe-expert-parallel-data-encoder"])
def test_two_ranks_generate_what_one_does(variant: str, flags: dict[str, Any],
                                          tiny_checkpoint: Any, tmp_path: Path) -> None:
    checkpoint = str(tiny_checkpoint(variant))
    conversations = _conversations(tmp_path)
    with LLM(checkpoint, **SMALL) as one:  # type: ignore[arg-type]
        want = _run(one, conversations)
        blocks_one = one.llm_engine.runner.cache_spec.num_blocks
    threads = torch.get_num_threads()
    with LLM(checkpoint, tensor_parallel_size=2, **flags, **SMALL) as two:  # type: ignore[arg-type]
        got = _run(two, conversations)
        engine = two.llm_engine
        assert engine.workers is not None and len(engine.workers.processes) == 1
        # Each rank caches its own KV heads: half the width, so twice the blocks per GiB.
        spec = engine.runner.cache_spec
        assert spec.num_kv_heads == engine.config.text.num_key_value_heads // 2
        assert spec.num_blocks // 2 == blocks_one  # (floor division of the same budget)
    assert torch.get_num_threads() == threads  # rank 0 shared the cores only while it ran
    for g, w in zip(got, want, strict=True):
        assert g.prompt_token_ids == w.prompt_token_ids
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for got_pos, want_pos in zip(g.outputs[0].logprobs, w.outputs[0].logprobs, strict=True):
            assert got_pos.keys() == want_pos.keys()
            for token, entry in got_pos.items():
                assert entry.logprob == pytest.approx(want_pos[token].logprob, abs=1e-4)


def test_a_dead_worker_ends_the_engine_with_its_reason(tiny_checkpoint: Any) -> None:
    llm = LLM(str(tiny_checkpoint("glm-4.1v-thinking")), tensor_parallel_size=2,
              **SMALL)  # type: ignore[arg-type]
    try:
        engine = llm.llm_engine
        assert engine.workers is not None
        worker = engine.workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)  # type: ignore[arg-type]
        deadline = time.monotonic() + 10
        while engine.death is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.death is not None and "rank 1" in engine.death
        assert f"status {-signal.SIGKILL}" in engine.death
        with pytest.raises(EngineDeadError, match="rank 1"):
            llm.generate("Anyone there?", GREEDY, use_tqdm=False)
    finally:
        started = time.monotonic()
        llm.shutdown()  # no barrier with a dead peer: returns at once
        assert time.monotonic() - started < 10


def test_a_model_that_does_not_split_fails_before_any_rank_starts(tiny_checkpoint: Any) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"attention heads \(8\) .* tensor-parallel size \(3\)"):
        LLM(str(tiny_checkpoint("glm-4.5v")), tensor_parallel_size=3,
            **SMALL)  # type: ignore[arg-type]
    assert time.monotonic() - started < 10
    assert not multiprocessing.active_children()
