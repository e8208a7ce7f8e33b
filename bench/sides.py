"""The two sides the engine benchmark compares, and what a run of each yields.

`GlmvSide` drives glmv's offline API (and its engine step by step for single-stream timings);
`HFSide` runs transformers' model, processor and `generate` on the same requests. Also the
per-run results (`Throughput`, `StreamTiming`), the weight bytes a decode step reads, and the
glmv decode profiler.
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import math
import pstats
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from workloads import QUESTIONS, Conversation, Workload, image_chats, machine_gbps, video_chats

from glmv import LLM, SamplingParams
from glmv.checkpoint import expected_tensors
from glmv.config import ModelConfig
from glmv.engine.llm_engine import LLMEngine
from glmv.engine.outputs import RequestOutput
from glmv.multimodal.processor import ProcessedPrompt

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


# ------------------------------------------------------------------------------ glmv side


class GlmvSide:
    """glmv's offline API, and its engine driven step by step for the single-stream timings."""

    name = "glmv"

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        start = time.perf_counter()
        self.llm = LLM(model=str(path), dtype="bfloat16", kv_cache_memory=args.kv_cache_gib,
                       quantization=args.quantization, max_num_seqs=args.max_num_seqs,
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


def bytes_read_per_token(config: ModelConfig, element_size: int = 2,
                         quantization: str | None = None) -> float:
    """Weight bytes one decode step reads, from the checkpoint layout (the live model may hold
    packed copies): the decoder layers, the final norm and the LM head (a tied table once),
    one embedding row, and of routed experts only the top-k share. With `quantization="int8"`
    the decoder's dense products read one byte per weight (their scales are negligible)."""
    moe = config.text.moe
    total = 0.0
    for name, shape, _ in expected_tensors(config):
        size: float = math.prod(shape) * element_size
        if "visual" in name:
            continue
        if quantization == "int8" and (_is_int8_product(name) or (
                name == "lm_head.weight" and not config.tie_word_embeddings)):
            size /= element_size
        if "embed_tokens" in name:
            total += size if config.tie_word_embeddings else size / shape[0]
            continue
        if ".experts." in name and moe is not None:
            size *= moe.num_experts_per_tok / moe.n_routed_experts
        total += size
    return total


def _is_int8_product(name: str) -> bool:
    """A decoder weight `--quantization int8` stores as int8 (layers/quantization.py)."""
    return (name.startswith("model.language_model.layers.") and name.endswith(".weight")
            and ".mlp.experts." not in name and "_proj." in name)


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
