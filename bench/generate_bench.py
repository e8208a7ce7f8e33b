"""Prefill and decode speed of glmv's plain generation loop, beside transformers on the same input.

    python bench/generate_bench.py --variant glm-4.1v-thinking --dtype bfloat16

Writes (once) a `bench`-size random checkpoint of the variant into $GLMV_CACHE_DIR, then times:
- prefill: one prompt of --prompt-len text tokens (tokens/s, median of 5);
- decode: --decode-tokens greedy tokens for batch sizes 1 and --batch (tokens/s), and the
  achieved weight bandwidth at batch 1 (bytes of weights read per token / time per token);
- the same prefill and batch-1 decode with transformers (`generate`, greedy, KV cache).
Prints one JSON object; record it with the command and machine in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from glmv.demo import cache_dir
from glmv.models.glm4v import Glm4vForConditionalGeneration
from glmv.models.loader import load_model
from glmv.multimodal.processor import MultiModalProcessor, ProcessedPrompt
from glmv.runner.generate import GenerationRequest, generate
from glmv.runner.kv_cache import KVCacheSpec
from glmv.runner.model_runner import ModelRunner
from glmv.tiny.writer import FORMAT_VERSION, TinyCheckpointSpec, write_checkpoint


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_checkpoint(variant: str) -> Path:
    path = cache_dir() / f"bench-{variant}-v{FORMAT_VERSION}"
    if not (path / "README.md").is_file():
        write_checkpoint(path, TinyCheckpointSpec(variant, "bench", seed=0))
    return path


def text_prompt(processor: MultiModalProcessor, length: int) -> ProcessedPrompt:
    ids = [processor.tokenizer.encode("[gMASK]<sop><|user|>\n")[0]]
    filler = processor.tokenizer.encode(" the picture shows a street with a red sign")
    while len(ids) < length:
        ids.extend(filler)
    return processor.process_token_ids(ids[:length])


def decode_time(runner: ModelRunner, prompt: ProcessedPrompt, batch: int, tokens: int) -> float:
    """Seconds for `tokens` decode steps of `batch` sequences: (prefill + steps) - prefill."""
    steps = [GenerationRequest(prompt, max_tokens=tokens + 1)] * batch
    first = [GenerationRequest(prompt, max_tokens=1)] * batch
    return (median_time(lambda: generate(runner, steps), 3)
            - median_time(lambda: generate(runner, first), 3))


def bytes_read_per_token(model: Glm4vForConditionalGeneration) -> float:
    """Weight bytes one decode step reads: decoder + LM head, one embedding row, and of the
    routed experts only the top-k of each MoE layer."""
    moe = model.config.text.moe
    total = 0.0
    for name, p in model.named_parameters():
        if "visual" in name or "embed_tokens" in name:
            continue
        size: float = p.numel() * p.element_size()
        if ".experts." in name and moe is not None:
            size *= moe.num_experts_per_tok / moe.n_routed_experts
        total += size
    return total


def time_glmv(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    processor = MultiModalProcessor.from_pretrained(path)
    start = time.perf_counter()
    model = load_model(path, processor.config, dtype=args.dtype, progress=False)
    load_s = time.perf_counter() - start
    dtype = next(model.parameters()).dtype
    cache = KVCacheSpec.for_memory(processor.config.text, 2 << 30, 16, dtype)
    runner = ModelRunner(model, cache)
    prompt = text_prompt(processor, args.prompt_len)
    for _ in range(3):  # warm-up: the first passes page in buffers and run slower
        generate(runner, [GenerationRequest(prompt, max_tokens=2)])
    prefill_s = median_time(lambda: generate(runner, [GenerationRequest(prompt, max_tokens=1)]))
    out: dict[str, Any] = {"load_s": round(load_s, 2),
                           "prefill_tok_s": round(args.prompt_len / prefill_s, 1)}
    short = text_prompt(processor, 16)
    for batch in (1, args.batch):
        decode_s = decode_time(runner, short, batch, args.decode_tokens)
        out[f"decode_tok_s_batch{batch}"] = round(batch * args.decode_tokens / decode_s, 1)
        if batch == 1:
            read = bytes_read_per_token(model)
            per_token_s = decode_s / args.decode_tokens
            out["decode_weight_GBps_batch1"] = round(read / per_token_s / 1e9, 1)
            out["weights_read_per_token_GB"] = round(read / 1e9, 3)
    return out


def time_transformers(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    processor = MultiModalProcessor.from_pretrained(path)
    ids = torch.tensor([text_prompt(processor, args.prompt_len).token_ids])
    short = torch.tensor([text_prompt(processor, 16).token_ids])

    def run(inputs: torch.Tensor, tokens: int) -> None:
        model.generate(inputs, max_new_tokens=tokens, do_sample=False)

    with torch.inference_mode():
        for _ in range(3):  # warm-up, as for glmv
            run(ids, 2)
        prefill_s = median_time(lambda: run(ids, 1))
        decode_s = (median_time(lambda: run(short, args.decode_tokens + 1), 3)
                    - median_time(lambda: run(short, 1), 3))
    return {"prefill_tok_s": round(args.prompt_len / prefill_s, 1),
            "decode_tok_s_batch1": round(args.decode_tokens / decode_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", default="glm-4.1v-thinking")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-transformers", action="store_true")
    args = parser.parse_args()
    path = bench_checkpoint(args.variant)
    result: dict[str, Any] = {
        "variant": args.variant, "size": "bench", "dtype": args.dtype,
        "prompt_len": args.prompt_len, "decode_tokens": args.decode_tokens,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "glmv": time_glmv(path, args),
    }
    if not args.no_transformers:
        result["transformers"] = time_transformers(path, args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
