"""What the engine benchmark feeds both sides, and what it measures of the machine.

The bench checkpoint, prompts of an exact token length, distinct images and short MP4s (so no
cache ever hits), the chats that carry them, and the machine's read bandwidth (plain sums and
batch-1 GEMVs), its description, and `CpuWatch` (CPU time other processes take meanwhile).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import PIL.Image
import torch

from glmv.demo import cache_dir
from glmv.kernels.memory import huge_page_empty
from glmv.tiny.writer import FORMAT_VERSION, TinyCheckpointSpec, write_checkpoint

PROMPT_PREFIX = "[gMASK]<sop><|user|>\n"
WORDS = ("time year people way day man thing woman life child world school state family group "
         "country problem hand part place case week company system program question work number "
         "night point home water room mother area money story fact month book eye job word side "
         "kind head house service friend father power hour game line member car city name team "
         "idea body face level office door health person art war history party result change "
         "morning reason girl moment air teacher force education street sign river").split()
IMAGE_SIZE = 448
VIDEO_SIZE = 224
QUESTIONS = ("What is shown in this picture?", "Describe what happens in this video.")
Conversation = list[dict[str, Any]]


# ------------------------------------------------------------------------------ workloads


def bench_checkpoint(variant: str) -> Path:
    """The `bench`-size random checkpoint of `variant`, written on first use."""
    path = cache_dir() / f"bench-{variant}-v{FORMAT_VERSION}"
    if not (path / "README.md").is_file():
        print(f"writing the bench checkpoint to {path}", file=sys.stderr)
        write_checkpoint(path, TinyCheckpointSpec(variant, "bench", seed=0))
    return path


def text_prompts(encode: Callable[[str], list[int]], num: int, length: int,
                 seed: int) -> list[str]:
    """`num` different texts of exactly `length` tokens: random words, topped up with " a"
    (one token each, split off by the pre-tokenizer)."""
    rng = random.Random(seed)
    prompts = []
    for index in range(num):
        text = f"{PROMPT_PREFIX}Request {seed}-{index}:"
        while True:
            longer = text + " " + rng.choice(WORDS)
            if len(encode(longer)) > length:
                break
            text = longer
        text += " a" * (length - len(encode(text)))
        if len(encode(text)) != length:
            raise RuntimeError(f"could not build a {length}-token prompt (got {text!r})")
        prompts.append(text)
    return prompts


def make_image(seed: int, size: int = IMAGE_SIZE) -> PIL.Image.Image:
    """A distinct RGB picture per seed: a colour gradient in a random direction plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    slopes = rng.uniform(-200, 200, size=(3, 2))
    base = rng.uniform(0, 255, size=3)
    channels = [base[c] + slopes[c, 0] * x + slopes[c, 1] * y for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 20, size=(size, size, 3))
    return PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_video(path: Path, seed: int, num_frames: int, fps: int) -> Path:
    """An H.264 MP4 of `num_frames` frames at `fps`: a gradient drifting across noise."""
    rng = np.random.default_rng(seed)
    background = np.asarray(make_image(seed, VIDEO_SIZE), dtype=np.int16)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        for index in range(num_frames):
            frame = np.roll(background, 7 * index, axis=1) + rng.integers(-15, 16, background.shape)
            image = np.clip(frame, 0, 255).astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def image_chats(images: Sequence[PIL.Image.Image]) -> list[Conversation]:
    return [[{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": QUESTIONS[0]}]}]
            for image in images]


def video_chats(paths: Sequence[Path]) -> list[Conversation]:
    return [[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": str(p)}},
                                          {"type": "text", "text": QUESTIONS[1]}]}]
            for p in paths]


@dataclass
class Workload:
    """One batch of requests, in the form each side takes."""

    kind: str  # "text", "image" or "video"
    texts: list[str]  # text: the prompts
    images: list[PIL.Image.Image]  # image: one per request
    videos: list[Path]  # video: one file per request

    @property
    def num_requests(self) -> int:
        return len(self.texts or self.images or self.videos)


def make_workload(kind: str, num: int, seed: int, args: argparse.Namespace,
                  encode: Callable[[str], list[int]], video_dir: Path) -> Workload:
    """`num` requests of `kind`; a different `seed` gives entirely different prompts and media."""
    if kind == "text":
        return Workload(kind, text_prompts(encode, num, args.input_len, seed), [], [])
    if kind == "image":
        return Workload(kind, [], [make_image(seed * 1000 + i) for i in range(num)], [])
    frames = round(args.video_seconds * args.video_fps)
    paths = [write_video(video_dir / f"clip-{seed}-{i}.mp4", seed * 1000 + i, frames,
                         args.video_fps) for i in range(num)]
    return Workload(kind, [], [], paths)


# ------------------------------------------------------------------------------ the machine


def read_bandwidth_gbps(dtype: torch.dtype, num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of a `torch.sum` over `num_bytes` of `dtype` (default threads), best of `repeats`,
    over ordinary memory and over memory in 2 MiB pages (where the system has them: glmv's
    weights live there, so the floor is never set by the slower of the two)."""
    count = num_bytes // torch.empty((), dtype=dtype).element_size()
    best = float("inf")
    for allocate in (torch.empty, huge_page_empty):  # one GiB at a time
        data = allocate((count,), dtype=dtype).fill_(1)
        for _ in range(repeats):
            start = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - start)
        del data
    return num_bytes / best / 1e9


#: Key of the read bandwidth sampled just before and after each single-stream decode run.
BESIDE_DECODE = "sum_float32_beside_decode"


def sample_bandwidth(bandwidth: dict[str, float]) -> float:
    """Measure `torch.sum`'s read bandwidth again (fp32 over 1 GiB, best of 2), keep the best
    such sample in `bandwidth[BESIDE_DECODE]` and return this one. This machine's bandwidth
    moves between ~32 and ~60 GB/s within minutes, so each single-stream run is bracketed by
    samples: the floor of the whole run is the best of everything measured (never a slower
    moment than the one a run ran in), and each run also gets the floor of its own moment,
    the better of its two neighbouring samples."""
    gbps = round(read_bandwidth_gbps(torch.float32, repeats=2), 1)
    bandwidth[BESIDE_DECODE] = max(bandwidth.get(BESIDE_DECODE, 0.0), gbps)
    return gbps


class CpuWatch:
    """CPU seconds spent on this machine by other processes while a timed run lasts. On a
    2-core box a concurrent job (a test run) can slow torch's threads several-fold; this says
    when a figure is not to be trusted. None where /proc/stat is missing."""

    def __enter__(self) -> CpuWatch:
        self.other_s: float | None = None
        self._start = (_busy_cpu_s(), _own_cpu_s())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own = _busy_cpu_s(), _own_cpu_s()
        if busy is not None and self._start[0] is not None:
            self.other_s = max(0.0, (busy - self._start[0]) - (own - self._start[1]))


def _busy_cpu_s() -> float | None:
    """Non-idle CPU seconds of the whole machine since boot (user .. steal of /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields)
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def gemv_bandwidth_gbps(layout: str, num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of one bf16 vector times a 1 GiB bf16 weight, as a batch-1 decode step does it:
    layout "plain" (torch's `F.linear`), "onednn" (oneDNN's packed linear) or "glmv" (glmv's
    bf16 blocks, what it runs on AVX-512 CPUs)."""
    from glmv.layers.linear import Bf16Blocks, OneDnnWeight

    in_features = 8192
    weight = torch.ones(num_bytes // 2 // in_features, in_features, dtype=torch.bfloat16)
    x = torch.ones(1, in_features, dtype=torch.bfloat16)
    if layout == "plain":
        def fn() -> torch.Tensor:
            return torch.nn.functional.linear(x, weight)
    else:
        packed = (Bf16Blocks if layout == "glmv" else OneDnnWeight).pack(weight, None)
        del weight
        fn = functools.partial(packed.apply, x)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


def gemv_bandwidths() -> dict[str, float]:
    """`gemv_bandwidth_gbps` of every layout this machine runs, rounded, by name."""
    from glmv.layers.linear import bf16_blocks_native, onednn_packing

    layouts = ["plain"] + ["onednn"] * onednn_packing() + ["glmv"] * bf16_blocks_native()
    return {f"gemv_{layout}_bfloat16": round(gemv_bandwidth_gbps(layout), 1)
            for layout in layouts}


def scenario_list(parser: argparse.ArgumentParser, text: str,
                  choices: Sequence[str]) -> list[str]:
    """A comma-separated --scenarios value as a list; a usage error names unknown ones."""
    scenarios = [s.strip() for s in text.split(",") if s.strip()]
    unknown = set(scenarios) - set(choices)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(choices)}")
    return scenarios


def machine() -> dict[str, Any]:
    from glmv import kernels

    model = kernels.cpuinfo_line("model name")
    return {"platform": platform.platform(), "processor": platform.processor() or None,
            "cpu": model.split(":", 1)[1].strip() if model else None,
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "glmv_kernels": kernels.status()}


def machine_gbps(bandwidth: dict[str, float]) -> float:
    """The machine's read bandwidth: the best of every way of reading memory measured (plain
    sums and both GEMVs), so the floor is never flattered by a slow measurement."""
    return max(bandwidth.values())
