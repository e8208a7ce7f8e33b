"""A bounded load test of `glmv serve` on loopback: many concurrent streaming clients, some of
which hang up mid-stream, against a real server process.

    python bench/load_test.py [--clients 200] [--disconnect-fraction 0.3] [--max-tokens 24]
                              [--rounds 2] [--model PATH | --variant glm-4.6v-flash]

Starts `glmv serve` on 127.0.0.1 (by default over a tiny random checkpoint of --variant, written
to a temporary folder on the fly), asks each prompt once without streaming for its expected
reply (greedy, EOS ignored), then runs --rounds loads of --clients concurrent streaming chats.
--disconnect-fraction of them, chosen by --seed, hang up before the response, right after its
headers or after a random number of chunks; every other one must receive exactly the expected
text, finish reason and usage. After each round it waits until /metrics shows no request
running, waiting or in flight and no KV block in use. Finally it sends SIGTERM and times the
drain. Prints one line per round and one JSON object: completed, hung up, wrong, TTFT p50/p99
(seconds from sending to the first text, of the clients that read to the end), throughput
(generated tokens of those clients per second of the round), the server's resident memory
before the first round, at its peak and after the last, and the KV blocks in use afterwards.
The load generation is bench/loadgen.py, shared with tests/reliability/test_load.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loadgen import (
    PROMPTS,
    expected_replies,
    plan_clients,
    rss_mib,
    run_load,
    wait_idle,
)
from peer_servers import ServerCommand, free_port, wait_healthy

from glmv.tiny.writer import TinyCheckpointSpec, write_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--disconnect-fraction", type=float, default=0.3)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="checkpoint folder (default: a tiny one)")
    p.add_argument("--variant", default="glm-4.6v-flash",
                   help="variant of the tiny checkpoint written when --model is not given")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--kv-cache-memory", type=float, default=0.05, help="GiB")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one round may take")
    args = p.parse_args(argv)
    if args.clients < 1 or not 0 <= args.disconnect_fraction <= 1 or args.max_tokens < 1:
        p.error("need --clients >= 1, 0 <= --disconnect-fraction <= 1, --max-tokens >= 1")
    return args


class RssPeak:
    """Samples a process's resident memory every 50 ms in a thread; `peak` is the highest."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, rss_mib(self.pid))
            except (OSError, RuntimeError):  # the process is gone
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def start_server(model: str, args: argparse.Namespace,
                 log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "glmv", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", args.dtype, "--max-num-seqs", str(args.max_num_seqs),
           "--kv-cache-memory", str(args.kv_cache_memory), "--max-model-len",
           str(args.max_model_len), "--max-queue-len", str(max(args.clients, 1024)),
           "--shutdown-timeout", str(args.shutdown_timeout)]
    command = ServerCommand("glmv serve", cmd, {}, port)
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ)
    try:
        wait_healthy(process, command, log, timeout_s=300)
    except RuntimeError as exc:
        process.kill()
        raise SystemExit(str(exc)) from None
    return process, command.url


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model = args.model
    if model is None:
        model = str(write_checkpoint(workdir / "ckpt", TinyCheckpointSpec(args.variant, "tiny",
                                                                          seed=0)))
    log = workdir / "serve.log"
    process, url = start_server(model, args, log)
    rounds: list[dict[str, Any]] = []
    try:
        expected = expected_replies(url, PROMPTS, args.max_tokens)
        rss_before = rss_mib(process.pid)
        sampler = RssPeak(process.pid)
        for index in range(args.rounds):
            seed = args.seed + index
            plans = plan_clients(args.clients, args.disconnect_fraction, expected, seed)
            report = asyncio.run(run_load(url, plans, expected, PROMPTS, args.max_tokens, seed,
                                          timeout=args.timeout))
            idle = wait_idle(url, timeout=60)
            print(f"round {index + 1}: {report.summary()} "
                  f"kv_blocks_used_after={idle['glmv_kv_cache_blocks_used']:.0f}", flush=True)
            for line in report.wrong[:5]:
                print("  wrong:", line)
            rounds.append({
                "clients": report.clients, "hung_up": report.hung_up,
                "completed": report.completed, "wrong": len(report.wrong),
                "wall_s": round(report.wall_s, 3),
                "ttft_p50_s": report.ttft_percentile(0.5),
                "ttft_p99_s": report.ttft_percentile(0.99),
                "completion_tokens_per_s": round(report.completion_tokens / report.wall_s, 1),
                "kv_blocks_used_after": idle["glmv_kv_cache_blocks_used"],
                "requests_in_flight_after": idle["glmv_num_requests_in_flight"]})
        rss_peak = sampler.stop()
        rss_after = rss_mib(process.pid)
    finally:
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            status = process.wait(args.shutdown_timeout + 30)
        except subprocess.TimeoutExpired:
            process.kill()
            status = process.wait()
    return {"command": " ".join(sys.argv), "model": model, "rounds": rounds,
            "rss_mib": {"before": round(rss_before, 1), "peak": round(rss_peak, 1),
                        "after": round(rss_after, 1)},
            "exit_status": status, "exit_s": round(time.monotonic() - signalled, 2)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="glmv-load-") as tmp:
        result = run(args, Path(tmp))
    rss = result["rss_mib"]
    print(f"server rss: before {rss['before']} MiB, peak {rss['peak']} MiB, after "
          f"{rss['after']} MiB; SIGTERM -> exit {result['exit_status']} in "
          f"{result['exit_s']} s")
    print(json.dumps(result))
    wrong = sum(r["wrong"] for r in result["rounds"])
    return 0 if wrong == 0 and result["exit_status"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
