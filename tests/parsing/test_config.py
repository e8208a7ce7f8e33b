"""ParserConfig.for_model: which output grammar each checkpoint writes."""

from __future__ import annotations

import dataclasses

import pytest

from glmv.errors import ConfigError, UnsupportedModelError
from glmv.parsing import ParserConfig


@pytest.mark.parametrize(("model_type", "has_answer_tags", "reasoning", "tools"), [
    ("glm4v", True, "glm41v", False),  # GLM-4.1V-9B-Thinking
    ("glm4v", False, "glm45", True),  # GLM-4.6V-Flash shares model_type glm4v
    ("glm4v_moe", False, "glm45", True),  # GLM-4.5V, GLM-4.6V
    ("glm46v", False, "glm45", True),  # transformers 5.x model_type
    ("glm4v_moe", True, "glm41v", False),  # the tokenizer decides
], ids=["glm41v", "glm46v-flash", "glm4v-moe", "glm46v", "moe-with-answer-tags"])
def test_for_model(model_type: str, has_answer_tags: bool, reasoning: str,
                   tools: bool) -> None:
    config = ParserConfig.for_model(model_type, has_answer_tags=has_answer_tags)
    assert (config.reasoning, config.enable_tools) == (reasoning, tools)


@pytest.mark.parametrize("model_type", ["llama", "glm4", "glm4_moe", "GLM4V", ""])
def test_unknown_model_type(model_type: str) -> None:
    with pytest.raises(UnsupportedModelError, match="glm46v, glm4v, glm4v_moe"):
        ParserConfig.for_model(model_type, has_answer_tags=False)
    assert issubclass(UnsupportedModelError, ConfigError)


def test_config_is_frozen() -> None:
    config = ParserConfig.for_model("glm4v_moe", has_answer_tags=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.enable_tools = False  # type: ignore[misc]
