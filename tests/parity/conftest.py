"""Shared inputs for the model parity tests: the same prompts and media, in glmv and transformers.

A case is a list of OpenAI-style messages plus the media both sides get: glmv through its
processor, transformers through its processor given PIL images and the full frame array with
metadata (so both run their own frame sampler).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

from glmv.models.loader import load_model
from glmv.multimodal.processor import MultiModalProcessor, ProcessedPrompt
from glmv.multimodal.video import VideoMetadata, process_frames

transformers = pytest.importorskip("transformers", reason="transformers is the reference")
skdata = pytest.importorskip("skimage.data", reason="real photographs come from scikit-image")

CASES = ("text", "image", "images", "video")
NUM_FRAMES, VIDEO_FPS = 30, 10.0


@dataclass
class Case:
    """One prompt: messages, the media for each side, the transformers processor kwargs."""

    messages: list[dict[str, Any]]
    images: list[PIL.Image.Image] = field(default_factory=list)
    frames: np.ndarray | None = None  # full video [N, H, W, 3] uint8

    def hf_media_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.images:
            kwargs["images"] = self.images
        if self.frames is not None:
            kwargs.update(videos=[self.frames], do_sample_frames=True, video_metadata=[{
                "total_num_frames": len(self.frames), "fps": VIDEO_FPS,
                "duration": len(self.frames) / VIDEO_FPS}])
        return kwargs


@pytest.fixture(scope="session")
def photos() -> list[PIL.Image.Image]:
    return [PIL.Image.fromarray(skdata.astronaut()).resize((300, 220)),
            PIL.Image.fromarray(skdata.chelsea()).resize((180, 250))]


@pytest.fixture(scope="session")
def video_frames() -> np.ndarray:
    """3 s at 10 fps of a photo panning sideways, so every frame pair differs."""
    base = skdata.coffee()[::4, ::4]
    return np.stack([np.roll(base, 3 * i, axis=1) for i in range(NUM_FRAMES)]).astype(np.uint8)


@pytest.fixture(scope="session")
def cases(photos: list[PIL.Image.Image], video_frames: np.ndarray) -> dict[str, Case]:
    def text(t: str) -> dict[str, str]:
        return {"type": "text", "text": t}

    return {
        "text": Case([{"role": "user", "content": "Hello, who are you?"}]),
        "image": Case([{"role": "user", "content": [{"type": "image"}, text("What is this?")]}],
                      photos[:1]),
        "images": Case([{"role": "user", "content": [text("Compare"), {"type": "image"},
                                                     {"type": "image"}, text("which is a cat?")]}],
                       photos),
        "video": Case([{"role": "user", "content": [{"type": "video"}, text("Describe.")]}],
                      frames=video_frames),
    }


def glmv_prompt(processor: MultiModalProcessor, case: Case) -> ProcessedPrompt:
    """The case through glmv's processor (media handed over in the message parts)."""
    media: list[Any] = list(case.images)
    if case.frames is not None:
        meta = VideoMetadata(len(case.frames), VIDEO_FPS, len(case.frames) / VIDEO_FPS,
                             case.frames.shape[2], case.frames.shape[1])
        media.append(process_frames(case.frames, meta, processor.video_config, sample=True))
    messages = []
    it = iter(media)
    for message in case.messages:
        content = message["content"]
        if isinstance(content, list):
            content = [{**p, p["type"]: next(it)} if p["type"] in ("image", "video") else p
                       for p in content]
        messages.append({**message, "content": content})
    return processor.process_chat(messages)


class Reference:
    """transformers' processor and model for one checkpoint, loaded once per dtype."""

    def __init__(self, ckpt: Path) -> None:
        self.ckpt = ckpt
        self.processor = transformers.AutoProcessor.from_pretrained(ckpt)
        self._models: dict[tuple[torch.dtype, str | None], Any] = {}

    def model(self, dtype: torch.dtype = torch.float32, experts: str | None = None) -> Any:
        key = (dtype, experts)
        if key not in self._models:
            kwargs = {"experts_implementation": experts} if experts else {}
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                self.ckpt, dtype=dtype, **kwargs).eval()
            model.generation_config.eos_token_id = None  # compare full lengths
            self._models[key] = model
        return self._models[key]

    def inputs(self, case: Case) -> Any:
        text = self.processor.apply_chat_template(case.messages, tokenize=False,
                                                  add_generation_prompt=True)
        return self.processor(text=[text], return_tensors="pt", **case.hf_media_kwargs())

    def logits(self, case: Case, dtype: torch.dtype = torch.float32,
               experts: str | None = None) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(dtype, experts)(**self.inputs(case)).logits[0].float()

    def greedy(self, case: Case, num_tokens: int) -> list[int]:
        inputs = self.inputs(case)
        with torch.inference_mode():
            out = self.model().generate(**inputs, max_new_tokens=num_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="session")
def reference(tiny_checkpoint: Any) -> Any:
    cache: dict[str, Reference] = {}

    def get(variant: str) -> Reference:
        if variant not in cache:
            cache[variant] = Reference(tiny_checkpoint(variant))
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def ours(tiny_checkpoint: Any) -> Any:
    """(variant, dtype) -> (glmv processor, glmv model), loaded once."""
    cache: dict[tuple[str, torch.dtype], tuple[MultiModalProcessor, Any]] = {}

    def get(variant: str, dtype: torch.dtype = torch.float32) -> tuple[MultiModalProcessor, Any]:
        if (variant, dtype) not in cache:
            ckpt = tiny_checkpoint(variant)
            cache[(variant, dtype)] = (MultiModalProcessor.from_pretrained(ckpt),
                                       load_model(ckpt, dtype=dtype, progress=False))
        return cache[(variant, dtype)]

    return get
