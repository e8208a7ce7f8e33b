"""Offline throughput and single-stream latency of glmv's engine beside transformers.

    python bench/engine_bench.py [--scenarios text,image,video,single] [--skip-hf] [--profile]

Writes (once) a `bench`-size random checkpoint of --variant into $GLMV_CACHE_DIR, loads it in
glmv (`LLM`) and in transformers (`AutoModelForImageTextToText`), and times both on the same
prompts, greedy, every request producing exactly --output-len tokens (EOS ignored):

- text / image / video: --num-requests different requests submitted as one batch (glmv:
  `LLM.generate` / `LLM.chat`, continuous batching; transformers: one left-padded `generate`).
  Wall time covers everything: tokenizing, media decoding and preprocessing, generation,
  detokenizing. Requests are text of --input-len tokens, a chat with one distinct 448x448
  image, or a chat with one distinct short MP4 (--video-seconds at --video-fps, 224x224).
- single: one text request at a time; time to first token (TTFT), time per output token
  (TPOT, median interval), decode tokens/s, and the weight bandwidth decode achieves
  (decoder + LM head bytes read per token / TPOT) against this machine's read bandwidth
  (the best of: `torch.sum` over 1 GiB in bf16 and fp32, a batch-1 bf16 GEMV over a 1 GiB
  weight plain and oneDNN-packed; best of 5 each) as `fraction_of_floor` (1.0 = at the
  memory floor); plus the TTFT of one single-image chat.
- --profile: cProfile and torch.profiler over 5 glmv decode steps at batch --num-requests.

Every timed run uses prompts and media no earlier run has seen, so glmv's prefix and encoder
caches (left on, as deployed) never hit. Each side warms up on 2 requests first. torch keeps
its default thread count. Each timed run records the CPU seconds other processes used
meanwhile (`other_processes_cpu_s`): on a 2-core machine a concurrent job slows torch several-
fold, so rerun when it is above ~1 s. Prints a table and then one JSON object; record both
with the command and machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import json
import math
import os
import platform
import pstats
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np
import PIL.Image
import torch

from glmv import LLM, SamplingParams
from glmv.checkpoint import expected_tensors
from glmv.config import ModelConfig
from glmv.demo import cache_dir
from glmv.engine.llm_engine import LLMEngine
from glmv.engine.outputs import RequestOutput
from glmv.multimodal.processor import ProcessedPrompt
from glmv.tiny.writer import FORMAT_VERSION, TinyCheckpointSpec, write_checkpoint

SCENARIOS = ("text", "image", "video", "single")
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


# ------------------------------------------------------------------------------ results


@dataclass
class Throughput:
    """One side's run of one batch."""

    seconds: float  # wall time, preprocessing to detokenized outputs
    num_requests: int
    num_input_tokens: int  # prompt tokens, media placeholders included
    num_output_tokens: int
    outputs: list[list[int]]  # generated ids per request, to compare the two sides

    def summary(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 3), "num_requests": self.num_requests,
                "num_input_tokens": self.num_input_tokens,
                "num_output_tokens": self.num_output_tokens,
                "output_tok_s": round(self.num_output_tokens / self.seconds, 1),
                "total_tok_s": round((self.num_input_tokens + self.num_output_tokens)
                                     / self.seconds, 1)}


@dataclass
class StreamTiming:
    """One request on its own: when its first token came, then the gaps between tokens."""

    ttft_s: float  # from before preprocessing to the first output token
    intervals_s: list[float]  # between consecutive output tokens

    @property
    def tpot_s(self) -> float:
        return statistics.median(self.intervals_s)

    @property
    def decode_tok_s(self) -> float:
        return len(self.intervals_s) / sum(self.intervals_s)


def stream_from_times(start: float, times: list[float]) -> StreamTiming:
    return StreamTiming(times[0] - start, [b - a for a, b in itertools.pairwise(times)])


def summarise_streams(runs: list[StreamTiming], bytes_per_token: float,
                      bandwidth: dict[str, float]) -> dict[str, Any]:
    """Medians over the runs, and the weight bandwidth decode achieves against the floor (the
    machine's best measured read bandwidth)."""
    tpot = statistics.median(r.tpot_s for r in runs)
    floor_s = bytes_per_token / (machine_gbps(bandwidth) * 1e9)
    return {"ttft_ms": round(1e3 * statistics.median(r.ttft_s for r in runs), 1),
            "tpot_ms": round(1e3 * tpot, 2),
            "decode_tok_s": round(statistics.median(r.decode_tok_s for r in runs), 1),
            "achieved_GBps": round(bytes_per_token / tpot / 1e9, 1),
            "fraction_of_floor": round(floor_s / tpot, 3)}


def machine_gbps(bandwidth: dict[str, float]) -> float:
    """The machine's read bandwidth: the best of every way of reading memory measured (plain
    sums and both GEMVs), so the floor is never flattered by a slow measurement."""
    return max(bandwidth.values())


# ------------------------------------------------------------------------------ glmv side


class GlmvSide:
    """glmv's offline API, and its engine driven step by step for the single-stream timings."""

    name = "glmv"

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        start = time.perf_counter()
        self.llm = LLM(model=str(path), dtype="bfloat16", kv_cache_memory=args.kv_cache_gib,
                       max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       enable_prefix_caching=True, show_progress=False)
        self.load_s = time.perf_counter() - start
        self.engine: LLMEngine = self.llm.llm_engine
        self._ids = 0

    def run(self, work: Workload, output_len: int) -> Throughput:
        params = greedy(output_len)
        start = time.perf_counter()
        if work.kind == "text":
            outputs = self.llm.generate(work.texts, params, use_tqdm=False)
        else:
            chats = image_chats(work.images) if work.kind == "image" else video_chats(work.videos)
            outputs = self.llm.chat(chats, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return throughput(seconds, outputs)

    def stream(self, prompt: str | Conversation, output_len: int) -> StreamTiming:
        """One request alone; a token's time is when the step that produced it returned."""
        start = time.perf_counter()
        processor = self.engine.processor
        processed: ProcessedPrompt = (processor.process(prompt) if isinstance(prompt, str)
                                      else processor.process_chat(prompt))
        self._ids += 1
        self.engine.add_request(f"bench-stream-{self._ids}", processed, greedy(output_len))
        times: list[float] = []
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                now = time.perf_counter()
                times.extend([now] * len(output.outputs[0].delta_token_ids))
        return stream_from_times(start, times)


def greedy(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def throughput(seconds: float, outputs: list[RequestOutput]) -> Throughput:
    generated = [list(o.outputs[0].token_ids) for o in outputs]
    cached = sum(o.num_cached_tokens for o in outputs)
    if cached:
        print(f"warning: {cached} prompt tokens came from glmv's prefix cache", file=sys.stderr)
    return Throughput(seconds, len(outputs), sum(len(o.prompt_token_ids) for o in outputs),
                      sum(len(g) for g in generated), generated)


def bytes_read_per_token(config: ModelConfig, element_size: int = 2) -> float:
    """Weight bytes one decode step reads, from the checkpoint layout (the live model may hold
    packed copies): the decoder layers, the final norm and the LM head (a tied table once),
    one embedding row, and of routed experts only the top-k share."""
    moe = config.text.moe
    total = 0.0
    for name, shape, _ in expected_tensors(config):
        size: float = math.prod(shape) * element_size
        if "visual" in name:
            continue
        if "embed_tokens" in name:
            total += size if config.tie_word_embeddings else size / shape[0]
            continue
        if ".experts." in name and moe is not None:
            size *= moe.num_experts_per_tok / moe.n_routed_experts
        total += size
    return total


def profile_decode(glmv: GlmvSide, prompts: list[str], num_steps: int, top: int) -> None:
    """cProfile and torch.profiler over `num_steps` engine steps of a full decode batch."""
    engine = glmv.engine
    ids = [f"bench-profile-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, engine.processor.process(prompt), greedy(64))
    started: set[str] = set()
    while len(started) < len(ids):  # until every prompt is prefilled
        started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    plain_ms = 1e3 * (time.perf_counter() - start) / num_steps
    profiler = cProfile.Profile()
    profiler.enable()
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    step_ms = 1e3 * (time.perf_counter() - start) / num_steps
    profiler.disable()
    print(f"\n== cProfile: {num_steps} decode steps at batch {len(ids)} ({plain_ms:.1f} ms/step "
          f"unprofiled, {step_ms:.1f} under cProfile), by own time ==")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(num_steps):
            engine.step()
    print(f"== torch.profiler: {num_steps} decode steps at batch {len(ids)} ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    engine.abort_request(ids)


# ------------------------------------------------------------------------------ transformers


class _TokenClock:
    """A `generate` streamer that only notes when each put (the prompt, then every new token)
    arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_decode_video(path: Path) -> Any:
    """All frames and the metadata, by transformers' PyAV reader. transformers 5 decodes a path
    given in the messages only with torchcodec (not installed; torchvision's reader is gone), so
    the frames go in decoded, and the processor samples them as glmv does from the path."""
    from transformers.video_utils import load_video

    source: Any = str(path)
    return load_video(source, backend="pyav",
                      sample_indices_fn=lambda metadata, **_: np.arange(metadata.total_num_frames))


class HFSide:
    """transformers' model, processor and `generate`, on the same requests."""

    name = "transformers"

    def __init__(self, path: Path) -> None:
        import transformers

        start = time.perf_counter()
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(
            path, dtype=torch.bfloat16).eval()
        self.model.generation_config.eos_token_id = None  # every request runs to its length
        self.processor = transformers.AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        self.load_s = time.perf_counter() - start
        self.version = transformers.__version__

    def inputs(self, work: Workload) -> Any:
        """The padded batch, built the way transformers' users do (media decoding included)."""
        if work.kind == "text":
            return self.processor.tokenizer(work.texts, padding=True, return_tensors="pt")
        kind, question = ("image", QUESTIONS[0]) if work.kind == "image" else ("video",
                                                                              QUESTIONS[1])
        chat = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": question}]}]
        rendered = self.processor.apply_chat_template(chat, tokenize=False,
                                                      add_generation_prompt=True)
        texts = [rendered] * work.num_requests
        if work.kind == "image":
            return self.processor(text=texts, images=work.images, padding=True,
                                  return_tensors="pt")
        decoded = [_hf_decode_video(p) for p in work.videos]
        return self.processor(text=texts, videos=[d[0] for d in decoded],
                              video_metadata=[d[1] for d in decoded], do_sample_frames=True,
                              padding=True, return_tensors="pt")

    def run(self, work: Workload, output_len: int) -> Throughput:
        start = time.perf_counter()
        inputs = self.inputs(work)
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=output_len,
                                  min_new_tokens=output_len)
        generated = out[:, inputs["input_ids"].shape[1]:]
        self.processor.batch_decode(generated, skip_special_tokens=True)
        seconds = time.perf_counter() - start
        return Throughput(seconds, work.num_requests, int(inputs["attention_mask"].sum()),
                          generated.numel(), generated.tolist())

    def stream(self, prompt: str | Conversation, output_len: int) -> StreamTiming:
        start = time.perf_counter()
        if isinstance(prompt, str):
            inputs = self.processor.tokenizer([prompt], return_tensors="pt")
        else:
            inputs = self.processor.apply_chat_template(
                prompt, tokenize=True, add_generation_prompt=True, return_dict=True,
                return_tensors="pt")
        clock = _TokenClock()
        self.model.generate(**inputs, do_sample=False, max_new_tokens=output_len,
                            min_new_tokens=output_len, streamer=clock)
        return stream_from_times(start, clock.times[1:])  # times[0]: the prompt


Side = GlmvSide | HFSide


# ------------------------------------------------------------------------------ the machine


def read_bandwidth_gbps(dtype: torch.dtype, num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of a `torch.sum` over `num_bytes` of `dtype` (default threads), best of `repeats`."""
    data = torch.ones(num_bytes // torch.empty((), dtype=dtype).element_size(), dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


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


def gemv_bandwidth_gbps(packed: bool, num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """GB/s of one bf16 vector times a 1 GiB bf16 weight, as a batch-1 decode step does it:
    torch's `F.linear` on the plain weight, or oneDNN's packed linear (what glmv runs)."""
    in_features = 8192
    weight = torch.ones(num_bytes // 2 // in_features, in_features, dtype=torch.bfloat16)
    x = torch.ones(1, in_features, dtype=torch.bfloat16)
    if packed:
        packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        del weight

        def fn() -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [], "")
    else:
        def fn() -> torch.Tensor:
            return torch.nn.functional.linear(x, weight)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or None,
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


# ------------------------------------------------------------------------------ scenarios


class Bench:
    """Runs the scenarios on both sides and collects their results."""

    def __init__(self, args: argparse.Namespace, sides: list[Side], video_dir: Path) -> None:
        self.args = args
        self.sides = sides
        self.glmv = sides[0]
        assert isinstance(self.glmv, GlmvSide)
        self.encode = self.glmv.engine.tokenizer.encode
        self.video_dir = video_dir
        self.seed = 0
        self.results: dict[str, dict[str, Any]] = {}

    def workload(self, kind: str, num: int) -> Workload:
        """Fresh requests: a new seed for every call, so no cache ever hits."""
        self.seed += 1
        return make_workload(kind, num, self.seed, self.args, self.encode, self.video_dir)

    def batch(self, kind: str) -> None:
        """One scenario: warm each side up on 2 requests, then time the full batch on each."""
        args = self.args
        num = args.video_requests if kind == "video" else args.num_requests
        work = self.workload(kind, num)
        result: dict[str, Any] = {}
        runs: dict[str, Throughput] = {}
        for side in self.sides:
            side.run(self.workload(kind, 2), 4)
            with CpuWatch() as watch:
                runs[side.name] = side.run(work, args.output_len)
            result[side.name] = runs[side.name].summary() | watched(watch, kind, side.name)
            print(f"{kind}: {side.name} {result[side.name]}", file=sys.stderr)
        if len(runs) == 2:
            result["agreement"] = agreement(runs["glmv"].outputs, runs["transformers"].outputs)
        self.results[kind] = result

    def single(self, bytes_per_token: float, bandwidth: dict[str, float]) -> None:
        """One request at a time: text TTFT/TPOT/bandwidth, then one-image TTFT."""
        args = self.args
        result: dict[str, Any] = {}
        for side in self.sides:
            side.stream(self.workload("text", 1).texts[0], 4)  # warm-up
            side.stream(image_chats(self.workload("image", 1).images)[0], 2)
            with CpuWatch() as watch:
                runs = [side.stream(self.workload("text", 1).texts[0], args.output_len)
                        for _ in range(args.single_repeats)]
                image = [side.stream(image_chats(self.workload("image", 1).images)[0], 2).ttft_s
                         for _ in range(args.single_repeats)]
            result[side.name] = summarise_streams(runs, bytes_per_token, bandwidth) | {
                "image_ttft_ms": round(1e3 * statistics.median(image), 1)}
            result[side.name] |= watched(watch, "single", side.name)
            print(f"single: {side.name} {result[side.name]}", file=sys.stderr)
        self.results["single"] = result


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, Any]:
    """How far the two sides' greedy outputs agree. With random bf16 weights the top logits
    are near ties, so outputs drift apart after a few tokens; the first token shows that the
    prompts (and media) were the same."""
    pairs = list(zip(ours, theirs, strict=True))
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b),
                   min(len(x), len(y))) for x, y in pairs]
    return {"same_first_token": f"{sum(x[:1] == y[:1] for x, y in pairs)}/{len(pairs)}",
            "same_all_tokens": f"{sum(x == y for x, y in pairs)}/{len(pairs)}",
            "mean_common_prefix": round(statistics.mean(prefix), 1)}


def watched(watch: CpuWatch, scenario: str, side: str) -> dict[str, Any]:
    """The interference figure for the JSON, and a warning when it is large."""
    if watch.other_s is not None and watch.other_s > 1.0:
        print(f"warning: other processes used {watch.other_s:.1f} CPU s during {scenario}/{side};"
              " its figures are distorted", file=sys.stderr)
    return {"other_processes_cpu_s": None if watch.other_s is None else round(watch.other_s, 2)}


# ------------------------------------------------------------------------------ report

# (label, scenario, key, higher is better)
ROWS = [
    ("text: output tok/s", "text", "output_tok_s", True),
    ("text: total tok/s", "text", "total_tok_s", True),
    ("image: output tok/s", "image", "output_tok_s", True),
    ("image: total tok/s", "image", "total_tok_s", True),
    ("video: output tok/s", "video", "output_tok_s", True),
    ("video: total tok/s", "video", "total_tok_s", True),
    ("single: TTFT ms", "single", "ttft_ms", False),
    ("single: TPOT ms", "single", "tpot_ms", False),
    ("single: decode tok/s", "single", "decode_tok_s", True),
    ("single: weight GB/s", "single", "achieved_GBps", True),
    ("single: fraction_of_floor", "single", "fraction_of_floor", True),
    ("single image: TTFT ms", "single", "image_ttft_ms", False),
]


def table(results: dict[str, dict[str, Any]]) -> str:
    """Scenario rows x (glmv, transformers, speedup); speedup > 1 means glmv is better."""
    lines = [f"{'':32}{'glmv':>12}{'transformers':>14}{'speedup':>10}"]
    for label, scenario, key, higher_better in ROWS:
        if scenario not in results:
            continue
        ours = results[scenario].get("glmv", {}).get(key)
        theirs = results[scenario].get("transformers", {}).get(key)
        ratio = "n/a"
        if ours and theirs:
            ratio = f"{(ours / theirs if higher_better else theirs / ours):.2f}x"
        lines.append(f"{label:32}{_cell(ours):>12}{_cell(theirs):>14}{ratio:>10}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--variant", default="glm-4.1v-thinking")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--skip-hf", action="store_true", help="glmv only")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--video-requests", type=int, default=None,
                        help="requests of the video scenario (default: --num-requests)")
    parser.add_argument("--input-len", type=int, default=128, help="tokens per text prompt")
    parser.add_argument("--output-len", type=int, default=64, help="tokens per request")
    parser.add_argument("--video-seconds", type=float, default=2.0)
    parser.add_argument("--video-fps", type=int, default=8)
    parser.add_argument("--single-repeats", type=int, default=3,
                        help="single-stream requests per side (medians are reported)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--profile", action="store_true",
                        help="also profile glmv decode steps at batch --num-requests")
    args = parser.parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    args.video_requests = args.video_requests or args.num_requests
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Load both sides, measure the machine, run the scenarios; the JSON report."""
    start = time.perf_counter()
    with CpuWatch() as idle:  # is anything else running on these cores?
        time.sleep(1.0)
    if idle.other_s is not None and idle.other_s > 0.2:
        print(f"warning: other processes kept {idle.other_s:.1f} cores busy in the second before "
              "starting; the figures will be distorted", file=sys.stderr)
    path = bench_checkpoint(args.variant)
    glmv = GlmvSide(path, args)
    hf = None if args.skip_hf else HFSide(path)
    sides: list[Side] = [glmv] if hf is None else [glmv, hf]
    config = glmv.engine.config
    per_token = bytes_read_per_token(config)
    bandwidth = {f"sum_{str(d).removeprefix('torch.')}": round(read_bandwidth_gbps(d), 1)
                 for d in (torch.bfloat16, torch.float32)}
    bandwidth["gemv_bfloat16"] = round(gemv_bandwidth_gbps(packed=False), 1)
    bandwidth["gemv_packed_bfloat16"] = round(gemv_bandwidth_gbps(packed=True), 1)
    with tempfile.TemporaryDirectory(prefix="glmv-bench-") as tmp:
        bench = Bench(args, sides, Path(tmp))
        for kind in args.scenarios:
            if kind == "single":
                bench.single(per_token, bandwidth)
            else:
                bench.batch(kind)
        if args.profile:
            profile_decode(glmv, bench.workload("text", args.num_requests).texts, 5, 25)
    return {
        "command": shlex.join(sys.orig_argv),
        "machine": machine() | {"read_GBps": bandwidth, "other_processes_cores_at_start": (
            None if idle.other_s is None else round(idle.other_s, 2))},
        "checkpoint": {"variant": args.variant, "size": "bench", "dtype": "bfloat16",
                       "path": str(path)},
        "args": {k: v for k, v in vars(args).items() if k != "profile"},
        "load_s": {side.name: round(side.load_s, 2) for side in sides},
        "transformers": None if hf is None else hf.version,
        "weights_read_per_token_GB": round(per_token / 1e9, 4),
        "decode_floor_ms": round(1e3 * per_token / (machine_gbps(bandwidth) * 1e9), 2),
        "results": bench.results,
        "total_run_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    args = parse_args()
    with torch.inference_mode():
        report = run(args)
    print()
    print(table(report["results"]))
    print(f"\nweights read per decode token: {report['weights_read_per_token_GB']} GB; "
          f"machine read bandwidth {report['machine']['read_GBps']} GB/s; decode floor "
          f"{report['decode_floor_ms']} ms/token; total run {report['total_run_s']} s")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
