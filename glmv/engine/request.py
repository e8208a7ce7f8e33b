"""One request as the scheduler and block manager see it: token ids, media spans, progress.

Everything here is plain Python (no torch): the engine keeps the preprocessed prompt (pixel
values, positions) in `payload`, which the scheduler never looks at.

    all_token_ids:  | prompt tokens ........ | output tokens ... |
    computed:       |<- num_computed_tokens ->|   (KV cache holds these)
    a step computes tokens [num_computed_tokens, num_computed_tokens + chunk)
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

from glmv.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no blocks
    RUNNING = "running"  # scheduled, holds blocks
    PREEMPTED = "preempted"  # lost its blocks to others; waits to recompute from the start
    FINISHED_STOPPED = "stop"  # a stop token or stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "abort"  # cancelled by the caller (or a disconnected client)
    FINISHED_ERROR = "error"  # a model step failed while it ran

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason: "stop", "length", "abort", "error"; None while unfinished."""
        return self.value if self.is_finished else None


@dataclass(frozen=True)
class MMSpan:
    """Where one image or video sits in the prompt: tokens [offset, offset + length)."""

    offset: int
    length: int
    content_hash: str  # hash of the preprocessed pixels: the same picture hashes the same
    item_idx: int  # index of the item in the prompt's media list

    @property
    def end(self) -> int:
        return self.offset + self.length


class ThinkingBudget:
    """Closes the thinking span after `budget` reasoning tokens (SGLang's semantics).

    While a `<think>` is open and at least `budget` tokens follow it, the next token is forced:
    a newline if the last token is not one, then `</think>`. Nothing is forced once `</think>`
    has appeared.
    """

    def __init__(self, budget: int, think_id: int, end_think_id: int, newline_id: int,
                 prompt_token_ids: list[int]) -> None:
        self.budget = budget
        self.think_id, self.end_think_id, self.newline_id = think_id, end_think_id, newline_id
        # A prompt may end inside an open <think> (a client continuing a reasoning turn).
        self.open_at: int | None = None  # index (in all tokens) of the open <think>
        self.closed = False
        for i, tok in enumerate(prompt_token_ids):
            if tok == think_id:
                self.open_at = i
            elif tok == end_think_id:
                self.open_at = None

    def observe(self, index: int, token_id: int) -> None:
        """Account for output token `token_id` at sequence index `index`."""
        if self.closed:
            return
        if token_id == self.think_id and self.open_at is None:
            self.open_at = index
        elif token_id == self.end_think_id:
            self.closed = True
            self.open_at = None

    def forced_token(self, all_token_ids: list[int]) -> int | None:
        if self.closed or self.open_at is None:
            return None
        if len(all_token_ids) - 1 - self.open_at < self.budget:
            return None
        return self.end_think_id if all_token_ids[-1] == self.newline_id else self.newline_id


class Request:
    """A prompt being completed: its tokens, media spans, progress and finish state."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...] = (),
        mm_spans: tuple[MMSpan, ...] = (),
        priority: int = 0,
        arrival_time: float | None = None,
        payload: Any = None,
        wait_for: Request | None = None,
        thinking_budget: ThinkingBudget | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids  # the model's own stop ids (ignored by ignore_eos)
        self.mm_spans = tuple(sorted(mm_spans, key=lambda s: s.offset))
        self.priority = priority  # lower runs first under the priority policy
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.payload = payload  # engine-side data (the preprocessed prompt); opaque here
        # n > 1: completions after the first wait until it has prefilled the shared prompt,
        # then take its blocks as prefix-cache hits instead of recomputing them.
        self.wait_for = wait_for
        self.thinking_budget = thinking_budget

        self.status = RequestStatus.WAITING
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = -1  # prompt tokens served by the prefix cache (-1: not yet)
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks, in order
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None  # the stop token id or stop string
        self.first_token_time: float | None = None  # time.monotonic() of its first output

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.all_token_ids.append(token_id)
        if self.thinking_budget is not None:
            self.thinking_budget.observe(len(self.all_token_ids) - 1, token_id)

    def forced_token(self) -> int | None:
        """The token the next sample must be (thinking budget spent), or None."""
        if self.thinking_budget is None:
            return None
        return self.thinking_budget.forced_token(self.all_token_ids)

    @property
    def stopped_on_token(self) -> bool:
        """Finished because its last token is a stop token (the model's or the request's)."""
        if self.status is not RequestStatus.FINISHED_STOPPED or not self.num_output_tokens:
            return False
        last, params = self.all_token_ids[-1], self.sampling_params
        return ((not params.ignore_eos and last in self.eos_token_ids)
                or last in params.stop_token_ids)

    def check_stop(self, max_model_len: int) -> bool:
        """After a new token: finish on a stop token, max_tokens or max_model_len."""
        params = self.sampling_params
        last = self.all_token_ids[-1]
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = last
                return True
        if ((params.max_tokens is not None and self.num_output_tokens >= params.max_tokens)
                or self.num_tokens >= max_model_len):
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def mm_hashes_in(self, start: int, end: int) -> tuple[str, ...]:
        """Content hashes of the media whose spans overlap tokens [start, end)."""
        return tuple(s.content_hash for s in self.mm_spans if s.offset < end and s.end > start)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.value}, "
                f"{self.num_computed_tokens}/{self.num_tokens} computed)")
