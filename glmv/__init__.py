"""glmv: an inference and serving engine for the GLM-V vision-language models.

    from glmv import LLM, SamplingParams

Importing glmv has no side effects: no threads, no torch flags, no network. `LLM` (which needs
torch) is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from glmv.sampling_params import SamplingParams
from glmv.version import __version__

if TYPE_CHECKING:
    from glmv.llm import LLM

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from glmv.llm import LLM

        return LLM
    raise AttributeError(f"module 'glmv' has no attribute {name!r}")
