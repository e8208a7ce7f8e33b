"""The vision tower over two gloo ranks, in both modes: split by weights (heads and SwiGLU
widths, like the decoder) and by data (whole on every rank, the items shared out and their
embeddings gathered). The float32 logits of an image, a video and a three-image prompt equal
those of one process, dense and MoE."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
import torch.multiprocessing as mp

from glmv.config import ModelConfig
from glmv.distributed.parallel_state import TPGroup, destroy_distributed, init_distributed
from glmv.errors import ConfigError
from glmv.models.glm4v_vision import Glm4vVisionModel, share_items
from glmv.models.loader import load_model
from glmv.multimodal.processor import MultiModalProcessor, ProcessedPrompt
from glmv.multimodal.video import VideoMetadata, process_frames
from tests.helpers import glmv_logits

MODES = ("weights", "data")
SIZES = ((40, 40), (64, 48), (30, 60))  # images of 6x6, 6x8 and 8x4 patches


def _image(width: int, height: int, seed: int) -> PIL.Image.Image:
    pixels = (np.arange(width * height * 3) * (seed + 1) % 251).astype(np.uint8)
    return PIL.Image.fromarray(pixels.reshape(height, width, 3))


def _prompts(checkpoint: Path) -> list[ProcessedPrompt]:
    """One image; one video (two frame pairs); three images of 36, 48 and 32 patches, which data
    mode shares out as [1] to rank 0 and [0, 2] to rank 1 (gathered back out of rank order,
    from shares of unequal length)."""
    processor = MultiModalProcessor.from_pretrained(checkpoint)
    frames = np.stack([np.roll(np.asarray(_image(64, 48, 0)), 5 * i, axis=1) for i in range(4)])
    video = process_frames(frames, VideoMetadata(4, 2.0, 2.0, 64, 48), processor.video_config,
                           sample=False)

    def user(*media: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [*media, {"type": "text", "text": "What is it?"}]}]

    return [processor.process_chat(user({"type": "image", "image": _image(64, 48, 0)})),
            processor.process_chat(user({"type": "video", "video": video})),
            processor.process_chat(user(*({"type": "image", "image": _image(w, h, seed)}
                                          for seed, (w, h) in enumerate(SIZES))))]


def _logits(checkpoint: Path, world_size: int = 1, mode: str = "weights") -> list[torch.Tensor]:
    model = load_model(checkpoint, dtype="float32", progress=False)
    vision = model.config.vision
    split = world_size if mode == "weights" else 1  # the tower's layers: split, or whole
    for block in model.visual.blocks:
        assert block.attn.num_heads == vision.num_heads // split
        assert block.attn.qkv.weight.shape[0] == 3 * vision.hidden_size // split
        assert block.attn.proj.weight.shape[1] == vision.hidden_size // split
        assert block.mlp.gate_up_proj.weight.shape[0] == 2 * vision.out_hidden_size // split
        assert block.mlp.down_proj.weight.shape[1] == vision.out_hidden_size // split
    merger = model.visual.merger
    assert merger.gate_up_proj.weight.shape[0] == 2 * vision.intermediate_size // split
    assert merger.down_proj.weight.shape[1] == vision.intermediate_size // split
    return [glmv_logits(model, prompt) for prompt in _prompts(checkpoint)]


def _worker(rank: int, port: int, checkpoint: Path, expected: list[torch.Tensor]) -> None:
    torch.set_num_threads(1)
    try:
        for mode in MODES:  # a second init_distributed keeps the process group, changes the mode
            init_distributed(2, rank, init_method=f"tcp://127.0.0.1:{port}", backend="gloo",
                             mm_encoder_tp_mode=mode)
            for got, want in zip(_logits(checkpoint, 2, mode), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        destroy_distributed()


@pytest.mark.parametrize("variant", ["glm-4.1v-thinking", "glm-4.5v"])
def test_two_ranks_encode_like_one_in_both_modes(variant: str, tiny_checkpoint: Any) -> None:
    checkpoint = tiny_checkpoint(variant)
    expected = _logits(checkpoint)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(port, checkpoint, expected), nprocs=2, join=True)


def test_heads_not_divisible_by_the_group_are_refused(tiny_checkpoint: Any) -> None:
    vision = ModelConfig.from_pretrained(tiny_checkpoint("glm-4.1v-thinking")).vision
    with pytest.raises(ConfigError, match="vision attention heads"):
        Glm4vVisionModel(vision, TPGroup(rank=0, size=3))
    # Data mode never splits the layers, so any group size builds.
    whole = Glm4vVisionModel(vision, TPGroup(rank=0, size=3, encoder_data_parallel=True))
    assert whole.blocks[0].attn.num_heads == vision.num_heads


def test_items_are_shared_by_patch_count() -> None:
    assert share_items([4, 1, 1, 2], 2) == [0, 1, 1, 1]  # largest first, to the lightest rank
    assert share_items([3, 3], 2) == [0, 1]
    assert share_items([5], 2) == [0]  # rank 1 encodes nothing (and still joins the gather)
