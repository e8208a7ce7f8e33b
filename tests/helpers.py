"""Helpers shared by test modules (no transformers needed)."""

from __future__ import annotations

import http.server
import threading
from typing import Any

import torch

from glmv.attention.metadata import AttentionMetadata
from glmv.multimodal.processor import ProcessedPrompt


def glmv_logits(model: Any, prompt: ProcessedPrompt) -> torch.Tensor:
    """Logits of every prompt position, one forward without KV cache."""
    ids = torch.tensor(prompt.token_ids)
    vision = mask = None
    if prompt.mm_items:
        pixels = torch.cat([i.pixel_values for i in prompt.mm_items])
        vision = model.encode_vision(pixels, [i.grid_thw for i in prompt.mm_items])
        mask = ids == model.config.image_token_id
    with torch.inference_mode():
        embeds = model.embed_with_vision(ids, vision, mask)
        hidden = model(embeds, prompt.positions, AttentionMetadata.without_cache([len(ids)]))
        return model.compute_logits(hidden).float()


def make_engine(processor: Any, model: Any, **kwargs: Any) -> Any:
    """An LLMEngine around a loaded model; kwargs are EngineArgs fields (small KV by default)."""
    from glmv.engine.config import EngineArgs
    from glmv.engine.llm_engine import LLMEngine

    kwargs.setdefault("kv_cache_memory", 0.02)
    return LLMEngine.from_model(processor, model, EngineArgs(**kwargs))


def run_engine(engine: Any, prompts: list[ProcessedPrompt], params: Any,
               prefix: str = "r") -> list[Any]:
    """Add every prompt, step until all finish; RequestOutputs in prompt order."""
    ids = [f"{prefix}{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    done: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = output
    return [done[i] for i in ids]


def write_mp4(path: Any, num_frames: int = 8, width: int = 64, height: int = 48,
              fps: int = 4) -> Any:
    """A small MPEG-4 video whose frames change colour, written to `path` (returned)."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = np.full((height, width, 3), ((i * 30) % 256, 100, (200 - i * 20) % 256),
                            dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


class ServerThreads:
    """HTTP servers each serving on a thread of its own, for a test; `stop()` ends them all."""

    def __init__(self) -> None:
        self.running: list[tuple[http.server.HTTPServer, threading.Thread]] = []

    def start(self, httpd: http.server.HTTPServer, poll_interval: float = 0.02) -> None:
        thread = threading.Thread(target=httpd.serve_forever,
                                  kwargs={"poll_interval": poll_interval}, daemon=True)
        thread.start()
        self.running.append((httpd, thread))

    def stop(self) -> None:
        for httpd, thread in self.running:
            httpd.shutdown()
            httpd.server_close()
            thread.join(timeout=5)
