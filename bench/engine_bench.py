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
  weight plain, oneDNN-packed and in glmv's bf16 blocks; best of 5 each; and `torch.sum`
  samples taken between the runs) as `fraction_of_floor` (1.0 = at the memory floor), and
  as `fraction_of_floor_beside`: each run against the better of the two samples around it,
  the median over runs (the bandwidth of the moment it ran in); plus the TTFT of one
  single-image chat.
- --profile: cProfile and torch.profiler over 5 glmv decode steps at batch --num-requests.

Every timed run uses prompts and media no earlier run has seen, so glmv's prefix and encoder
caches (left on, as deployed) never hit. Before each timed batch each side runs a warm-up
batch of the same shape (other prompts and media, 2 output tokens): a process's first step of
a size touches fresh memory, which right after the bandwidth samples have freed their GiB is
slow to fault in (glmv's first 2048-token prefill there: 570-660 ms instead of 420-440; the
same step later, its memory reused, faults no page at all). torch keeps
its default thread count. Each timed run records the CPU seconds other processes used
meanwhile (`other_processes_cpu_s`): on a 2-core machine a concurrent job slows torch several-
fold, so rerun when it is above ~1 s. Prints a table and then one JSON object; record both
with the command and machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from sides import (
    GlmvSide,
    HFSide,
    Side,
    StreamTiming,
    Throughput,
    bytes_read_per_token,
    profile_decode,
    summarise_streams,
)
from workloads import (
    CpuWatch,
    Workload,
    bench_checkpoint,
    gemv_bandwidths,
    image_chats,
    machine,
    machine_gbps,
    make_workload,
    read_bandwidth_gbps,
    sample_bandwidth,
    scenario_list,
)

from glmv.server.launch import freeze_startup_heap

SCENARIOS = ("text", "image", "video", "single")


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
        """One scenario: warm each side up on a batch of the same shape (other prompts, 2 output
        tokens), then time the full batch on each."""
        args = self.args
        num = args.video_requests if kind == "video" else args.num_requests
        work = self.workload(kind, num)
        result: dict[str, Any] = {}
        runs: dict[str, Throughput] = {}
        for side in self.sides:
            side.run(self.workload(kind, num), 2)  # warm-up of the same shape
            with CpuWatch() as watch:
                runs[side.name] = side.run(work, args.output_len)
            result[side.name] = runs[side.name].summary() | watched(watch, kind, side.name)
            print(f"{kind}: {side.name} {result[side.name]}", file=sys.stderr)
        if len(runs) == 2:
            result["agreement"] = agreement(runs["glmv"].outputs, runs["transformers"].outputs)
        self.results[kind] = result

    def single(self, bytes_per_token: dict[str, float], bandwidth: dict[str, float]) -> None:
        """One request at a time: text TTFT/TPOT/bandwidth, then one-image TTFT.
        `bytes_per_token`: weight bytes each side reads per token (int8 reads fewer). The text
        runs are bracketed by read-bandwidth samples (`sample_bandwidth`, into `bandwidth`);
        every side's fraction of the floor is taken against the best of all of them."""
        args = self.args
        result: dict[str, Any] = {}
        runs: dict[str, list[StreamTiming]] = {}
        for side in self.sides:
            side.stream(self.workload("text", 1).texts[0], 4)  # warm-up
            side.stream(image_chats(self.workload("image", 1).images)[0], 2)
            with CpuWatch() as watch:
                runs[side.name] = []
                samples = [sample_bandwidth(bandwidth)]
                for _ in range(args.single_repeats):
                    runs[side.name].append(side.stream(self.workload("text", 1).texts[0],
                                                       args.output_len))
                    samples.append(sample_bandwidth(bandwidth))
                image = [side.stream(image_chats(self.workload("image", 1).images)[0], 2).ttft_s
                         for _ in range(args.single_repeats)]
            beside = [bytes_per_token[side.name] / run.tpot_s / 1e9 / max(before, after)
                      for run, before, after in zip(runs[side.name], samples, samples[1:],
                                                    strict=False)]
            result[side.name] = {
                "fraction_of_floor_beside": round(statistics.median(beside), 3),
                "image_ttft_ms": round(1e3 * statistics.median(image), 1)}
            result[side.name] |= watched(watch, "single", side.name)
        for side in self.sides:
            result[side.name] = summarise_streams(runs[side.name], bytes_per_token[side.name],
                                                  bandwidth) | result[side.name]
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
    ("single: fraction, floor beside", "single", "fraction_of_floor_beside", True),
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
    parser.add_argument("--quantization", choices=("int8",), default=None,
                        help="glmv's side: W8A8 int8 decoder products")
    parser.add_argument("--profile", action="store_true",
                        help="also profile glmv decode steps at batch --num-requests")
    args = parser.parse_args(argv)
    args.scenarios = scenario_list(parser, args.scenarios, SCENARIOS)
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
    # Both models and their libraries live as long as the run: out of the cyclic collector's
    # reach, as `glmv serve` does at start-up, so that a full collection (a pause of tens of
    # ms over this heap) does not land inside one side's timings and not the other's.
    freeze_startup_heap()
    config = glmv.engine.config
    per_token = {side.name: bytes_read_per_token(config) for side in sides}
    per_token["glmv"] = bytes_read_per_token(config, quantization=args.quantization)
    bandwidth = {f"sum_{str(d).removeprefix('torch.')}": round(read_bandwidth_gbps(d), 1)
                 for d in (torch.bfloat16, torch.float32)}
    bandwidth |= gemv_bandwidths()
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
        "weights_read_per_token_GB": {k: round(v / 1e9, 4) for k, v in per_token.items()},
        "decode_floor_ms": {k: round(1e3 * v / (machine_gbps(bandwidth) * 1e9), 2)
                            for k, v in per_token.items()},
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
