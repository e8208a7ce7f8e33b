"""Request fields -> SamplingParams, with the checkpoint's generation_config.json as defaults.

Like vLLM's `--generation-config auto`: temperature, top_p, top_k and repetition_penalty the
model's authors ship are the defaults a request overrides field by field.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmv.errors import SamplingParamsError
from glmv.sampling_params import SamplingParams
from glmv.server.protocol import SamplingFields

logger = logging.getLogger(__name__)
#: Completions per prompt a request may ask for (OpenAI's limit too). The engine builds every
#: one of them at once, so an unbounded `n` (say 10**9) would stall its thread for all requests.
MAX_N = 128


@dataclass(frozen=True)
class SamplingDefaults:
    """Defaults for fields a request leaves out (OpenAI's, then the checkpoint's)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def from_generation_config(cls, model_dir: Path | None) -> SamplingDefaults:
        path = model_dir / "generation_config.json" if model_dir is not None else None
        if path is None or not path.is_file():
            return cls()
        try:
            config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable %s: %s", path, exc)
            return cls()
        greedy = config.get("do_sample") is False
        return cls(
            temperature=0.0 if greedy else float(config.get("temperature", 1.0)),
            top_p=float(config.get("top_p", 1.0)),
            top_k=int(config.get("top_k", 0) or 0),
            repetition_penalty=float(config.get("repetition_penalty", 1.0)))


def _stop(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def build_sampling_params(body: SamplingFields, defaults: SamplingDefaults, *,
                          max_tokens: int | None, logprobs: int | None,
                          thinking_budget: int | None = None,
                          keep_special_token_ids: tuple[int, ...] = ()) -> SamplingParams:
    """The request's sampling settings; out-of-range values raise SamplingParamsError (400)."""
    if body.logit_bias:
        raise SamplingParamsError("logit_bias is not supported by glmv")
    if body.n > MAX_N:
        raise SamplingParamsError(f"n must be at most {MAX_N}, got {body.n}")
    temperature = body.temperature if body.temperature is not None else defaults.temperature
    if body.do_sample is False:
        temperature = 0.0
    return SamplingParams(
        n=body.n,
        temperature=temperature,
        top_p=body.top_p if body.top_p is not None else defaults.top_p,
        top_k=body.top_k if body.top_k is not None else defaults.top_k,
        min_p=body.min_p if body.min_p is not None else 0.0,
        repetition_penalty=(body.repetition_penalty if body.repetition_penalty is not None
                            else defaults.repetition_penalty),
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        seed=body.seed,
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        stop=_stop(body.stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        include_stop_str_in_output=body.include_stop_str_in_output,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens,
        keep_special_token_ids=keep_special_token_ids,
        thinking_budget=thinking_budget,
    )
