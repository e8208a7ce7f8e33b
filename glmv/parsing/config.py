"""ParserConfig: which output grammar a model writes, chosen once per model."""

from __future__ import annotations

from dataclasses import dataclass

from glmv.errors import UnsupportedModelError
from glmv.parsing.reasoning import get_reasoning_style

# config.json model_types of the GLM-V family (transformers 5.x also names a `glm46v` type).
_KNOWN_MODEL_TYPES = frozenset({"glm4v", "glm4v_moe", "glm46v"})


@dataclass(frozen=True)
class ParserConfig:
    """The per-model half of parsing; per-request options are arguments of the parse calls.

    Invariant: `reasoning` is None or a key of `REASONING_STYLES` (checked on construction).
    """

    reasoning: str | None  # reasoning style name ("glm41v", "glm45"); None: no reasoning parse
    enable_tools: bool  # parse <tool_call> blocks (the model's template supports tools)

    def __post_init__(self) -> None:
        if self.reasoning is not None:
            get_reasoning_style(self.reasoning)  # raises ConfigError for an unknown name

    @classmethod
    def for_model(cls, model_type: str, *, has_answer_tags: bool) -> ParserConfig:
        """The config for a checkpoint, from config.json's `model_type` and its tokenizer.

        `has_answer_tags` (the tokenizer has an `<answer>` token) is what tells GLM-4.1V apart
        from GLM-4.6V-Flash, which share `model_type == "glm4v"`.
        """
        if model_type not in _KNOWN_MODEL_TYPES:
            raise UnsupportedModelError(
                f"no output parser for model_type {model_type!r}; "
                f"known: {', '.join(sorted(_KNOWN_MODEL_TYPES))}"
            )
        if has_answer_tags:
            return cls(reasoning="glm41v", enable_tools=False)
        return cls(reasoning="glm45", enable_tools=True)
