"""The models split over two gloo ranks: the logits of every prompt position (float32) equal
those of the whole model on one process, for text, an image and a video, dense and MoE (the routed
experts each split in width, or, with expert parallel, placed whole on the ranks)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
import torch.multiprocessing as mp

from glmv.distributed.parallel_state import destroy_distributed, init_distributed
from glmv.models.loader import load_model
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import MultiModalProcessor, ProcessedPrompt
from tests.helpers import glmv_logits, write_mp4


def _prompts(checkpoint: Path) -> list[ProcessedPrompt]:
    processor = MultiModalProcessor.from_pretrained(checkpoint, media_policy=MediaPolicy.local())
    pixels = (np.arange(64 * 48 * 3) % 251).astype(np.uint8).reshape(48, 64, 3)
    image = PIL.Image.fromarray(pixels)
    video = checkpoint.parent / f"{checkpoint.name}-clip.mp4"
    if not video.exists():  # written once, by the single-process run before the ranks start
        write_mp4(video)  # (two ranks rewriting it while the other reads gave torn videos)
    return [
        processor.process_chat([{"role": "user", "content": "Say something about tensors."}]),
        processor.process_chat([{"role": "user", "content": [
            {"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]}]),
        processor.process_chat([{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": str(video)}},
            {"type": "text", "text": "What happens?"}]}]),
    ]


def _logits(checkpoint: Path, world_size: int = 1,
            expert_parallel: bool = False) -> list[torch.Tensor]:
    model = load_model(checkpoint, dtype="float32", progress=False)
    text = model.config.text
    attention = model.model.language_model.layers[0].self_attn
    assert attention.num_heads == text.num_attention_heads // world_size  # really split
    assert model.lm_head.weight.shape[0] * world_size >= text.vocab_size
    if text.moe is not None:
        experts = model.model.language_model.layers[-1].mlp.experts
        split = (world_size, 1) if expert_parallel else (1, world_size)
        assert experts.w13.shape[:2] == (text.moe.n_routed_experts // split[0],
                                         2 * text.moe.moe_intermediate_size // split[1])
    return [glmv_logits(model, prompt) for prompt in _prompts(checkpoint)]


def _worker(rank: int, port: int, checkpoint: Path, expected: list[torch.Tensor],
            expert_parallel: bool) -> None:
    torch.set_num_threads(1)
    init_distributed(2, rank, init_method=f"tcp://127.0.0.1:{port}", backend="gloo",
                     enable_expert_parallel=expert_parallel)
    try:
        for got, want in zip(_logits(checkpoint, 2, expert_parallel), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        destroy_distributed()


@pytest.mark.parametrize("variant, expert_parallel", [
    ("glm-4.1v-thinking", False), ("glm-4.6v-flash", False), ("glm-4.5v", False),
    ("glm-4.5v", True)])
def test_two_ranks_give_the_logits_of_one(variant: str, expert_parallel: bool,
                                          tiny_checkpoint: Any) -> None:
    checkpoint = tiny_checkpoint(variant)
    expected = _logits(checkpoint)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, checkpoint, expected, expert_parallel), nprocs=2, join=True)
