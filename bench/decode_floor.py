"""One stream's decode steps against the memory floor of the moment they ran in.

    python bench/decode_floor.py [--blocks 12] [--steps 30] [--quantization int8]

This machine's read bandwidth moves by tens of percent within minutes (docs/benchmarks.md),
so a decode time set against a bandwidth measured at another moment says as much about the
host as about the engine. Here one text request (--input-len prompt tokens, greedy, EOS
ignored) decodes in --blocks blocks of --steps engine steps, and before every block and after
the last `torch.sum` reads 1 GiB of fp32 (best of 3, over ordinary memory and over 2 MiB
pages, as bench/workloads.py measures the machine). Each block's floor is the weights one
step reads (decoder, final norm and LM head: `bytes_read_per_token`) over the better of the
two samples around it; its fraction is that floor over the block's median step (1.0 = each
step at the speed of a plain sum). A step here is the whole `LLMEngine.step`: scheduling, the
runner's inputs, the kernels, sampling and detokenizing (no HTTP). The KV cache grows by one
token per step, so late blocks also read more cache (~12 MB per 1,000 tokens for the bench
model). A last block of --steps steps runs under torch.profiler: the time each of glmv's
kernels takes per step (its GB/s where it reads a known part of the weights) and what is left
of that block's median step outside them (Python, the runner's inputs, small torch ops, and
the profiler's own cost: an upper bound). Prints a table and one JSON object; record both
with the command and machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from typing import Any

import torch
from sides import bytes_read_per_token
from workloads import bench_checkpoint, machine, text_prompts

from glmv.config import ModelConfig
from glmv.engine.llm_engine import LLMEngine
from glmv.kernels.memory import huge_page_empty
from glmv.llm import LLM
from glmv.sampling_params import SamplingParams
from glmv.server.launch import freeze_startup_heap

GIB = 1 << 30


class SumProbe:
    """`torch.sum` over 1 GiB of fp32 (ordinary and 2 MiB pages): workloads.read_bandwidth_gbps's
    measure, with its buffers held for the whole run instead of 2 GiB mapped, filled and
    freed around every block of timed steps."""

    def __init__(self) -> None:
        count = GIB // 4
        self.buffers = [torch.ones(count), huge_page_empty((count,), torch.float32).fill_(1)]

    def gbps(self, repeats: int = 3) -> float:
        best = float("inf")
        for data in self.buffers:
            for _ in range(repeats):
                start = time.perf_counter()
                data.sum()
                best = min(best, time.perf_counter() - start)
        return GIB / best / 1e9


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--variant", default="glm-4.1v-thinking")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--steps", type=int, default=30, help="decode steps per block")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    parser.add_argument("--quantization", choices=("int8",), default=None)
    args = parser.parse_args()
    if args.blocks < 1 or args.steps < 1:
        parser.error("--blocks and --steps must be at least 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    path = bench_checkpoint(args.variant)
    llm = LLM(model=str(path), dtype="bfloat16", quantization=args.quantization,
              kv_cache_memory=2.0, enable_prefix_caching=False, show_progress=False)
    engine = llm.llm_engine
    freeze_startup_heap()
    per_token = bytes_read_per_token(engine.config, quantization=args.quantization)
    probe = SumProbe()
    tokenizer = llm.get_tokenizer()
    prompt = text_prompts(tokenizer.encode, 1, args.input_len, seed=1)[0]
    params = SamplingParams(max_tokens=(args.blocks + 1) * args.steps + 2, temperature=0.0,
                            ignore_eos=True)
    processed = engine.processor.process(prompt)
    engine.add_request("floor", processed, params)
    engine.step()  # the prefill
    engine.step()  # a first decode step: its buffers exist before any timing
    samples = [probe.gbps()]
    blocks: list[dict[str, Any]] = []
    context = len(processed.token_ids) + 1  # cached tokens when the next step starts
    for _ in range(args.blocks):
        steps = []
        for _ in range(args.steps):
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
        samples.append(probe.gbps())
        median = statistics.median(steps)
        gbps = max(samples[-2:])
        blocks.append({"context_tokens": context, "step_ms_median": round(1e3 * median, 2),
                       "step_ms_min": round(1e3 * min(steps), 2),
                       "achieved_GBps": round(per_token / median / 1e9, 1),
                       "sum_GBps_around": [round(s, 1) for s in samples[-2:]],
                       "fraction_of_floor": round(per_token / (gbps * 1e9) / median, 3)})
        context += args.steps
    kernels = profile_kernels(engine, args.steps, engine.config, args.quantization)
    engine.abort_request("floor")
    fractions = [b["fraction_of_floor"] for b in blocks]
    best = max(samples)
    return {
        "command": shlex.join(sys.orig_argv),
        "machine": machine(),
        "checkpoint": {"variant": args.variant, "size": "bench", "path": str(path),
                       "quantization": args.quantization},
        "weights_read_per_token_GB": round(per_token / 1e9, 4),
        "blocks": blocks,
        "fraction_of_floor_median": round(statistics.median(fractions), 3),
        "fraction_of_floor_range": [min(fractions), max(fractions)],
        "sum_GBps_range": [round(min(samples), 1), round(best, 1)],
        "profiled_block": kernels,
        "fraction_of_best_sample": round(
            per_token / (best * 1e9) / statistics.median(
                [b["step_ms_median"] / 1e3 for b in blocks]), 3),
    }


def profile_kernels(engine: LLMEngine, steps: int, config: ModelConfig,
                    quantization: str | None) -> dict[str, Any]:
    """Over `steps` engine steps under torch.profiler: the median step, and the mean
    milliseconds per step of each `glmv::` op, with the GB/s of the two that read whole parts
    of the weights (all decoder layers; the LM head: its greedy bf16 product, or with int8 its
    int8 product, the only `int8_linear` call of a decode step outside `decode_layers`)."""
    times = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
    text = config.text
    head_bytes = text.vocab_size * text.hidden_size * (1 if quantization == "int8" else 2)
    reads = {"glmv::decode_layers": bytes_read_per_token(config, quantization=quantization)
             - head_bytes,
             "glmv::int8_linear" if quantization == "int8" else "glmv::bf16_linear_argmax":
             head_bytes}
    kernels: dict[str, Any] = {}
    for event in prof.key_averages():
        if event.key.startswith("glmv::"):
            ms = event.self_cpu_time_total / 1e3 / steps
            kernels[event.key] = {"ms": round(ms, 3), "calls_per_step": event.count / steps}
            if event.key in reads and ms > 0:
                kernels[event.key]["GBps"] = round(reads[event.key] / (ms / 1e3) / 1e9, 1)
    step_ms = 1e3 * statistics.median(times)
    return {"step_ms_median": round(step_ms, 2), "kernels_ms": kernels,
            "outside_kernels_ms": round(step_ms - sum(k["ms"] for k in kernels.values()), 2)}


def main() -> None:
    args = parse_args()
    with torch.inference_mode():
        report = run(args)
    print("| context tokens | step ms (median / min) | weight GB/s | sum GB/s around "
          "| fraction of the moment's floor |")
    print("|---|---|---|---|---|")
    for b in report["blocks"]:
        around = " / ".join(str(s) for s in b["sum_GBps_around"])
        print(f"| {b['context_tokens']} | {b['step_ms_median']} / {b['step_ms_min']} "
              f"| {b['achieved_GBps']} | {around} | {b['fraction_of_floor']} |")
    print(f"\nweights read per token {report['weights_read_per_token_GB']} GB; fraction of "
          f"the moment's floor: median {report['fraction_of_floor_median']}, range "
          f"{report['fraction_of_floor_range']}; sums {report['sum_GBps_range']} GB/s; "
          f"against the best sum of the run: {report['fraction_of_best_sample']}")
    profiled = report["profiled_block"]
    print(f"profiled block: step {profiled['step_ms_median']} ms (median), glmv's kernels "
          f"{profiled['kernels_ms']}; outside them {profiled['outside_kernels_ms']} ms")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
