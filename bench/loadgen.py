"""Load against a running `glmv serve`: many concurrent streaming chat clients, some of which
hang up part-way, every other one checked against the reply of a non-streamed request.

Shared by `bench/load_test.py` (the script) and `tests/reliability/test_load.py` (the test);
it needs only httpx and the standard library. Every client sends one greedy chat request with
`ignore_eos`, so its reply is fixed by its prompt: a client that reads its stream to the end
must see exactly the text, finish reason and usage of the same request made without
streaming. A client that hangs up does so at a point drawn from a seeded RNG: before the
response arrives, right after its headers, or after some number of SSE chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

#: Distinct prompts the clients cycle through (different lengths, so prefills differ).
PROMPTS: tuple[str, ...] = (
    "Describe a quiet harbour at dawn.",
    "List three uses of a paperclip.",
    "Why is the sky blue? Answer briefly.",
    "Write a haiku about compilers.",
    "Explain continuous batching to a child, in two sentences, with an example.",
    "What is 17 times 23?",
)
#: `hang_up_after` of a client that leaves before the response headers arrive.
BEFORE_RESPONSE = -1
#: Engine gauges that must all read 0 once every request has ended.
IDLE_GAUGES = ("glmv_num_requests_running", "glmv_num_requests_waiting",
               "glmv_num_requests_in_flight", "glmv_kv_cache_blocks_used")
_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


@dataclass(frozen=True)
class ClientPlan:
    index: int
    prompt: int  # index into the prompts
    hang_up_after: int | None  # None: read to the end; BEFORE_RESPONSE; k >= 0: after k chunks


@dataclass(frozen=True)
class Expected:
    """What a complete reply to one prompt is (from a non-streamed request)."""

    reasoning: str
    content: str
    finish_reason: str | None
    usage: dict[str, Any]
    chunks: int = 0  # `data:` events of the reply streamed, before [DONE]


@dataclass
class Reply:
    """What one streaming client saw."""

    status: int | None = None
    reasoning: str = ""
    content: str = ""
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    chunks: int = 0  # `data:` events other than [DONE]
    done: bool = False  # [DONE] arrived
    error: str | None = None  # an in-band error event or a transport error
    ttft: float | None = None  # seconds from sending to the first text
    hung_up: bool = False


@dataclass
class LoadReport:
    clients: int
    hung_up: int
    completed: int  # clients that read to the end and got [DONE]
    wrong: list[str]  # one line per client whose reply was not the expected one
    wall_s: float
    ttfts: list[float] = field(default_factory=list)  # of clients that read to the end
    completion_tokens: int = 0  # of clients that read to the end

    def ttft_percentile(self, q: float) -> float | None:
        if not self.ttfts:
            return None
        ranked = sorted(self.ttfts)
        return ranked[min(len(ranked) - 1, round(q * (len(ranked) - 1)))]

    def summary(self) -> str:
        p50, p99 = self.ttft_percentile(0.5), self.ttft_percentile(0.99)
        return (f"clients={self.clients} hung_up={self.hung_up} completed={self.completed} "
                f"wrong={len(self.wrong)} wall={self.wall_s:.1f}s "
                f"ttft_p50={_fmt(p50)}s ttft_p99={_fmt(p99)}s "
                f"tokens/s={self.completion_tokens / self.wall_s:.0f}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def plan_clients(clients: int, disconnect_fraction: float, expected: Sequence[Expected],
                 seed: int) -> list[ClientPlan]:
    """`clients` plans cycling through the prompts; round(clients * disconnect_fraction) of
    them, chosen by `seed`, hang up before the response, right after its headers (0) or after
    k chunks, k < the stream's last text chunk (so mid-stream)."""
    rng = random.Random(seed)
    leaving = set(rng.sample(range(clients), round(clients * disconnect_fraction)))
    plans = []
    for i in range(clients):
        prompt = i % len(expected)
        # A full stream: role chunk, text chunks (the last with finish_reason), usage.
        last = max(expected[prompt].chunks - 3, 0)
        plans.append(ClientPlan(i, prompt, rng.randint(BEFORE_RESPONSE, last)
                                if i in leaving else None))
    return plans


def chat_body(prompt: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}],
                            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                            "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def expected_replies(base_url: str, prompts: Sequence[str], max_tokens: int,
                     timeout: float = 120.0) -> list[Expected]:
    """The non-streamed reply to each prompt (greedy, so every stream must match it), with the
    number of chunks of the same reply streamed (one stream, alone, which must match too)."""
    out = []
    with httpx.Client(timeout=timeout) as client:
        for prompt in prompts:
            response = client.post(base_url + "/v1/chat/completions",
                                   json=chat_body(prompt, max_tokens, stream=False))
            response.raise_for_status()
            data = response.json()
            choice = data["choices"][0]
            message = choice["message"]
            expected = Expected(message.get("reasoning_content") or "",
                                message.get("content") or "", choice["finish_reason"],
                                data["usage"])
            streamed = asyncio.run(_one_stream(base_url, chat_body(prompt, max_tokens, True),
                                               timeout))
            problem = check_reply(streamed, expected)
            if problem is not None:
                raise AssertionError(f"a lone stream of {prompt!r} differs from the "
                                     f"non-streamed reply: {problem}")
            out.append(dataclasses.replace(expected, chunks=streamed.chunks))
    return out


async def _one_stream(base_url: str, body: dict[str, Any], timeout: float) -> Reply:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await stream_chat(client, base_url, body, None, random.Random(0))


async def stream_chat(client: httpx.AsyncClient, base_url: str, body: dict[str, Any],
                      hang_up_after: int | None, rng: random.Random) -> Reply:
    """One streaming chat request, read to the end or abandoned as `hang_up_after` says."""
    reply = Reply()
    start = time.monotonic()
    if hang_up_after == BEFORE_RESPONSE:
        task = asyncio.ensure_future(client.post(base_url + "/v1/chat/completions", json=body))
        await asyncio.sleep(rng.uniform(0.0, 0.05))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await task  # it may have been answered already: that is fine too
        reply.hung_up = True
        return reply
    try:
        async with client.stream("POST", base_url + "/v1/chat/completions",
                                 json=body) as response:
            reply.status = response.status_code
            if response.status_code != 200:
                reply.error = (await response.aread()).decode(errors="replace")[:200]
                return reply
            if hang_up_after == 0:
                reply.hung_up = True
                return reply
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    reply.done = True
                    break
                _take_chunk(reply, json.loads(data), start)
                if hang_up_after is not None and reply.chunks >= hang_up_after:
                    reply.hung_up = True
                    return reply
    except httpx.HTTPError as exc:
        reply.error = f"{type(exc).__name__}: {exc}"
    return reply


def _take_chunk(reply: Reply, event: dict[str, Any], start: float) -> None:
    reply.chunks += 1
    if "error" in event:
        reply.error = json.dumps(event["error"])
        return
    if event.get("usage"):
        reply.usage = event["usage"]
    for choice in event.get("choices") or ():
        delta = choice.get("delta") or {}
        text = (delta.get("reasoning_content") or "") + (delta.get("content") or "")
        if text and reply.ttft is None:
            reply.ttft = time.monotonic() - start
        reply.reasoning += delta.get("reasoning_content") or ""
        reply.content += delta.get("content") or ""
        if choice.get("finish_reason") is not None:
            reply.finish_reason = choice["finish_reason"]


def check_reply(reply: Reply, expected: Expected) -> str | None:
    """None when a client that read to the end got exactly the expected reply, else why not."""
    problems = []
    if reply.error is not None or reply.status != 200:
        problems.append(f"status {reply.status}, error {reply.error}")
    if not reply.done:
        problems.append("no [DONE]")
    if (reply.reasoning, reply.content) != (expected.reasoning, expected.content):
        problems.append(f"text {reply.reasoning + reply.content!r:.80} != "
                        f"{expected.reasoning + expected.content!r:.80}")
    if reply.finish_reason != expected.finish_reason:
        problems.append(f"finish_reason {reply.finish_reason} != {expected.finish_reason}")
    if _comparable(reply.usage) != _comparable(expected.usage):
        problems.append(f"usage {reply.usage} != {expected.usage}")
    return "; ".join(problems) or None


def _comparable(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Usage without `cached_tokens`, which depends on what the prefix cache held."""
    if usage is None:
        return None
    details = {k: v for k, v in (usage.get("prompt_tokens_details") or {}).items()
               if k != "cached_tokens"}
    return {**usage, "prompt_tokens_details": details}


async def run_load(base_url: str, plans: Sequence[ClientPlan], expected: Sequence[Expected],
                   prompts: Sequence[str], max_tokens: int, seed: int,
                   timeout: float = 300.0) -> LoadReport:
    """Every plan's client at once; each one that reads to the end is checked."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=len(plans) + 8, max_keepalive_connections=0)
    start = time.monotonic()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        replies = await asyncio.wait_for(asyncio.gather(*(
            stream_chat(client, base_url, chat_body(prompts[p.prompt], max_tokens, True),
                        p.hang_up_after, random.Random(rng.random()))
            for p in plans)), timeout)
    wall = time.monotonic() - start
    report = LoadReport(clients=len(plans), hung_up=0, completed=0, wrong=[], wall_s=wall)
    for plan, reply in zip(plans, replies, strict=True):
        if plan.hang_up_after is not None and reply.hung_up:
            report.hung_up += 1
            continue
        # A client meant to hang up late may have had its whole reply first: check it too.
        problem = check_reply(reply, expected[plan.prompt])
        if problem is not None:
            report.wrong.append(f"client {plan.index} (prompt {plan.prompt}): {problem}")
            continue
        report.completed += 1
        if reply.ttft is not None:
            report.ttfts.append(reply.ttft)
        report.completion_tokens += int((reply.usage or {}).get("completion_tokens", 0))
    return report


# -- the server's state ---------------------------------------------------------------------

def metrics(base_url: str) -> dict[str, float]:
    """/metrics as {name: value}, label sets summed."""
    text = httpx.get(base_url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _METRIC_LINE.match(line)
        if match:
            out[match[1]] = out.get(match[1], 0.0) + float(match[3])
    return out


def wait_idle(base_url: str, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until every IDLE_GAUGES reads 0; the last reading (raises on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        values = metrics(base_url)
        if all(values.get(name) == 0 for name in IDLE_GAUGES):
            return values
        if time.monotonic() > deadline:
            busy = {name: values.get(name) for name in IDLE_GAUGES}
            raise TimeoutError(f"the server is not idle {timeout:g} s after the load: {busy}")
        time.sleep(0.1)


def memory_mib(pid: int) -> dict[str, float]:
    """A process's resident memory now (VmRSS) and its peak since it started (VmHWM), MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            fields[name] = int(value.split()[0]) / 1024  # kB
    if len(fields) != 2:
        raise RuntimeError(f"no VmRSS/VmHWM for process {pid}")
    return fields


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB."""
    return memory_mib(pid)["VmRSS"]


# -- a full queue ---------------------------------------------------------------------------

@dataclass
class OverloadReport:
    holders_complete: int  # requests holding the queue that read a complete reply
    refused: int  # extra requests answered 503 (--max-queue-len)
    other: list[str]  # anything else, one line each
    refusal_s: list[float]  # seconds each 503 took
    hold_s: float = 0.0  # seconds from the first holder's request to the last one's end

    def summary(self) -> str:
        worst = max(self.refusal_s, default=0.0)
        median = statistics.median(self.refusal_s) if self.refusal_s else 0.0
        return (f"holders_complete={self.holders_complete} (in {self.hold_s:.1f}s) "
                f"refused_503={self.refused} other={len(self.other)} "
                f"503_latency_median={median:.3f}s max={worst:.3f}s")


async def full_queue(base_url: str, holders: int, extra: int, hold_tokens: int,
                     timeout: float = 120.0) -> OverloadReport:
    """Fill a server whose --max-queue-len is `holders` with that many streams of
    `hold_tokens` tokens, then send `extra` more requests while it is full: each should get a
    503 at once, and the holders their whole replies."""
    limits = httpx.Limits(max_connections=holders + extra + 8, max_keepalive_connections=0)
    report = OverloadReport(0, 0, [], [])

    async def refused(client: httpx.AsyncClient, index: int) -> None:
        start = time.monotonic()
        body = chat_body(PROMPTS[index % len(PROMPTS)], 8, stream=False)
        response = await client.post(base_url + "/v1/chat/completions", json=body)
        if response.status_code == 503 and "--max-queue-len" in response.text:
            report.refused += 1
            report.refusal_s.append(time.monotonic() - start)
        else:
            report.other.append(f"extra {index}: {response.status_code} {response.text[:160]}")

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout)) as client:
        rng = random.Random(0)
        started = time.monotonic()
        holding = [asyncio.ensure_future(stream_chat(
            client, base_url, chat_body(PROMPTS[i % len(PROMPTS)], hold_tokens, True), None,
            rng)) for i in range(holders)]
        deadline = time.monotonic() + timeout
        while (await client.get(base_url + "/metrics")).text.count(
                f"glmv_num_requests_in_flight {holders:.1f}") == 0:
            if time.monotonic() > deadline or any(task.done() for task in holding):
                for task in holding:
                    task.cancel()
                raise RuntimeError("the holders never filled the queue (--max-queue-len "
                                   f"{holders}?); make them longer")
            await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.gather(*(refused(client, i) for i in range(extra))),
                               timeout)
        replies = await asyncio.wait_for(asyncio.gather(*holding), timeout)
        report.hold_s = time.monotonic() - started
    for index, reply in enumerate(replies):
        tokens = (reply.usage or {}).get("completion_tokens")
        if reply.done and reply.error is None and tokens == hold_tokens:
            report.holders_complete += 1
        else:
            report.other.append(f"holder {index}: status {reply.status}, {tokens} tokens, "
                                f"error {reply.error}")
    return report
