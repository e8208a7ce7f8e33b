"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's names).

Validated once when built; the engine never sees an out-of-range value. Nothing here imports
torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from glmv.errors import SamplingParamsError

#: Most top logprobs a request may ask for (OpenAI allows 20).
MAX_LOGPROBS = 20


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SamplingParamsError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping settings of one request; temperature 0 means greedy.

    Invariants after construction: every number is finite and in range, `stop` and
    `stop_token_ids` are tuples, `top_k` is 0 when off (-1 is accepted as vLLM's spelling).
    """

    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1) = off
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # subtracted once from tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    seed: int | None = None  # per-request generator: same seed, same tokens, whatever the batch
    max_tokens: int | None = 16  # None = until max_model_len
    min_tokens: int = 0  # stop tokens are masked until this many tokens exist
    stop: tuple[str, ...] = ()  # stop strings (output is cut before them)
    stop_token_ids: tuple[int, ...] = ()  # extra stop tokens, besides the model's own
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False  # do not stop at the model's own stop tokens
    logprobs: int | None = None  # return the sampled token's logprob and this many top ones
    skip_special_tokens: bool = True  # drop special tokens from the text (not token_ids)
    # Special tokens kept in the text even when skipping them (the server keeps the grounding
    # box markers for its parser).
    keep_special_token_ids: tuple[int, ...] = ()
    thinking_budget: int | None = None  # reasoning tokens before </think> is forced
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # passed through

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        ids = () if self.stop_token_ids is None else tuple(self.stop_token_ids)
        object.__setattr__(self, "stop_token_ids", ids)
        object.__setattr__(self, "keep_special_token_ids", tuple(self.keep_special_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        _check(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(_is_number(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 or -1 = off), got {self.top_k!r}")
        _check(_is_number(self.min_p) and 0 <= self.min_p <= 1,
               f"min_p must be in [0, 1], got {self.min_p!r}")
        _check(_is_number(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_number(value) and -2 <= value <= 2,
                   f"{name} must be in [-2, 2], got {value!r}")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an integer, got "
               f"{self.seed!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0,
               f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check(all(isinstance(s, str) and s for s in self.stop),
               f"stop must be non-empty strings, got {list(self.stop)!r}")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
               f"stop_token_ids must be token ids (integers >= 0), got "
               f"{list(self.stop_token_ids)!r}")
        _check(self.logprobs is None or (_is_int(self.logprobs)
                                         and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        _check(self.thinking_budget is None or (_is_int(self.thinking_budget)
                                                and self.thinking_budget >= 0),
               f"thinking_budget must be an integer >= 0, got {self.thinking_budget!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0
                or self.frequency_penalty != 0)

    def for_child(self, index: int) -> SamplingParams:
        """Settings of completion `index` of an n > 1 request: n = 1 and, when seeded, seed +
        index, so the completions differ but each is reproducible."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)

    @classmethod
    def greedy(cls, max_tokens: int | None = 16, **kwargs: Any) -> SamplingParams:
        return cls(temperature=0.0, max_tokens=max_tokens, **kwargs)

