"""A fake runner over a fake paged KV cache, and helpers for scheduler tests.

Every slot holds a key of the tokens (and images) up to that position; each chunk checks
that its whole context reads back right through its block table, so a wrong block id or a
bad prefix hit fails loudly.
"""

from __future__ import annotations

from collections.abc import Sequence

from glmv.engine.block_manager import BlockManager
from glmv.engine.config import SchedulerConfig
from glmv.engine.outputs import RunnerOutput, SchedulerOutput
from glmv.engine.request import MMSpan, Request
from glmv.engine.scheduler import Scheduler
from glmv.sampling_params import SamplingParams

BS = 4
VOCAB = 1000


def next_token(tokens: Sequence[int]) -> int:
    """The fake model: a deterministic function of the whole sequence."""
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 7 + 3) % VOCAB


def prefix_keys(request: Request, end: int) -> list[int]:
    """What the KV of positions [0, end) must hold: a chained key of tokens and images."""
    keys, key = [], 0
    for p in range(end):
        images = tuple(s.content_hash for s in request.mm_spans if s.offset <= p < s.end)
        key = hash((key, request.all_token_ids[p], images))
        keys.append(key)
    return keys


class FakeRunner:
    """Writes every chunk's KV first (as the real attention does), then checks each context."""

    def __init__(self, block_size: int = BS, script: dict[str, list[int]] | None = None) -> None:
        self.block_size = block_size
        self.kv: dict[int, int] = {}  # slot -> key
        self.script = script or {}  # request id -> its output tokens, instead of next_token
        self.fail: set[str] = set()
        self.last_samples: list[bool] = []  # chunk.samples as seen before the update

    def execute(self, work: SchedulerOutput) -> RunnerOutput:
        bs = self.block_size
        self.last_samples = [c.samples for c in work.chunks]
        for c in work.chunks:
            assert c.num_tokens > 0 and len(c.block_ids) * bs >= c.end
            keys = prefix_keys(c.request, c.end)
            broken = c.request.request_id in self.fail  # a failed forward leaves garbage
            for p in range(c.start, c.end):
                self.kv[c.block_ids[p // bs] * bs + p % bs] = -1 if broken else keys[p]
        sampled = {}
        for c in work.chunks:
            if c.request.request_id in self.fail:
                continue
            keys = prefix_keys(c.request, c.end)
            got = [self.kv.get(c.block_ids[p // bs] * bs + p % bs) for p in range(c.end)]
            assert got == keys, f"{c.request.request_id}: stale KV in its blocks"
            if c.samples:
                rid = c.request.request_id
                script = self.script.get(rid)
                sampled[rid] = (script[c.request.num_output_tokens] if script
                                else next_token(c.request.all_token_ids))
        failed = {c.request.request_id: "boom" for c in work.chunks
                  if c.request.request_id in self.fail}
        return RunnerOutput(sampled=sampled, failed=failed)


def make_request(request_id: str, prompt: Sequence[int] | int, max_tokens: int | None = 4,
                 spans: tuple[MMSpan, ...] = (), eos: tuple[int, ...] = (),
                 params: SamplingParams | None = None, priority: int = 0,
                 arrival_time: float | None = None, wait_for: Request | None = None) -> Request:
    """A request; an int prompt means tokens 1..prompt."""
    tokens = list(range(1, prompt + 1)) if isinstance(prompt, int) else list(prompt)
    params = params or SamplingParams.greedy(max_tokens=max_tokens)
    return Request(request_id, tokens, params, eos_token_ids=eos, mm_spans=spans,
                   priority=priority, arrival_time=arrival_time, wait_for=wait_for)


def make_scheduler(num_blocks: int = 64, prefix: bool = True, max_num_batched_tokens: int = 64,
                   max_model_len: int = 64, max_num_seqs: int = 8, policy: str = "fcfs",
                   chunked: bool = True, hold: bool = True) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             max_model_len=max_model_len, enable_chunked_prefill=chunked,
                             policy=policy,  # type: ignore[arg-type]
                             hold_partial_prefills=hold)
    return Scheduler(config, BlockManager(num_blocks, BS, prefix))


def step(sched: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[Request]]:
    work = sched.schedule()
    assert work.num_batched_tokens <= sched.config.max_num_batched_tokens
    return work, sched.update_from_output(work, runner.execute(work))


def chunks_of(work: SchedulerOutput) -> list[tuple[str, int, int]]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in work.chunks]


def run_to_end(sched: Scheduler, runner: FakeRunner, max_steps: int = 500
               ) -> list[SchedulerOutput]:
    steps: list[SchedulerOutput] = []
    while sched.has_unfinished_requests():
        assert len(steps) < max_steps, "no progress"
        steps.append(step(sched, runner)[0])
    return steps


def expected_output(prompt: Sequence[int], num: int) -> list[int]:
    """What the fake model generates greedily after `prompt`."""
    tokens = list(prompt)
    for _ in range(num):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]
