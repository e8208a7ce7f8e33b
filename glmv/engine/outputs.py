"""Contracts between the scheduler, the runner and callers (plain data, no torch).

    Scheduler.schedule() -> SchedulerOutput (which tokens of which requests, their blocks)
    ModelRunner.execute(SchedulerOutput) -> RunnerOutput (one sampled token per finished chunk)
    LLMEngine.step() -> list[RequestOutput] (what changed for each request this step)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from glmv.engine.request import Request


@dataclass
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of one request, computed in this step."""

    request: Request
    start: int  # request.num_computed_tokens when scheduled
    num_tokens: int  # > 0
    block_ids: list[int]  # the request's whole block table, covering start + num_tokens
    # The chunk reaches the request's last token, so this step yields its next token. Fixed
    # when scheduled (the request grows by that token afterwards).
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = self.end == self.request.num_tokens

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    """The work of one step; chunks are in the order the runner lays out their tokens."""

    chunks: list[ScheduledChunk]
    preempted: list[Request] = field(default_factory=list)  # lost their blocks this step
    finished_ids: list[str] = field(default_factory=list)  # finished since the last step

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass
class Logprob:
    """The log-probability of one token and its rank in the distribution (1 = most likely)."""

    logprob: float
    rank: int


#: One position's logprobs: the sampled token first, then the top ones, by token id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class RunnerOutput:
    """What one forward produced: a token per sampling chunk, keyed by request id."""

    sampled: dict[str, int]
    logprobs: dict[str, PositionLogprobs] = field(default_factory=dict)  # requests asking
    failed: dict[str, str] = field(default_factory=dict)  # request id -> error message


@dataclass
class CompletionOutput:
    """One completion of a request (n > 1 gives several, by index)."""

    index: int
    text: str  # decoded output so far (stop strings cut off)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort", "error"; None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[PositionLogprobs] | None = None  # per output token, when asked
    cumulative_logprob: float | None = None
    error: str | None = None  # why it failed, when finish_reason is "error"
    # What this step added (for streaming). The delta text holds back a tail that may begin a
    # stop string until it is resolved, so streamed deltas always add up to `text`.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and completions; `finished` once every completion has ended."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_image_tokens: int = 0  # prompt tokens filled by images
    num_video_tokens: int = 0  # prompt tokens filled by video frames
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    # time.monotonic() when its first output token was sampled (the earliest of its
    # completions); None before that. A final-only caller's time to first token.
    first_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)
