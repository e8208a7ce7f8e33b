"""Table rows shared by the parsing tests: one `Case` per completion, with its expected parse.

Each test module keeps its own table (reasoning, tool calls, grounding); `test_streaming` runs
every row of every table through the streaming invariants as well.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from glmv.parsing import ParsedCompletion, ParserConfig

GLM41V = ParserConfig.for_model("glm4v", has_answer_tags=True)
GLM45 = ParserConfig.for_model("glm4v_moe", has_answer_tags=False)
CONFIGS = {"glm41v": GLM41V, "glm45": GLM45}

THINK_OFF = "<think></think>\n"  # what the server prefills when thinking is off (protocol 2.2)
BOX_START, BOX_END = "<|begin_of_box|>", "<|end_of_box|>"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "metric": {"type": "boolean"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time",
                                         "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]


@dataclass(frozen=True)
class Case:
    """One completion and what it must parse to (`calls`: (name, decoded arguments) pairs)."""

    id: str
    text: str
    reasoning: str | None = None
    content: str | None = None
    calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    model: str = "glm45"  # key of CONFIGS
    kwargs: dict[str, Any] = field(default_factory=dict)  # parse_completion keyword arguments
    arguments: tuple[str, ...] | None = None  # exact arguments JSON strings, when checked

    @property
    def config(self) -> ParserConfig:
        return CONFIGS[self.model]

    def check(self, result: ParsedCompletion) -> None:
        assert (result.reasoning, result.content) == (self.reasoning, self.content)
        got = [(c.name, json.loads(c.arguments)) for c in result.tool_calls]
        assert got == [(name, args) for name, args in self.calls]
        if self.arguments is not None:
            assert tuple(c.arguments for c in result.tool_calls) == self.arguments


def params(cases: list[Case]) -> list[Any]:
    """pytest.param per case, with its id."""
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return [pytest.param(c, id=c.id) for c in cases]


def call(name: str, *pairs: tuple[str, str], newline: bool = True) -> str:
    """A GLM tool call as the model writes it (protocol 3.2)."""
    sep = "\n" if newline else ""
    body = "".join(f"{sep}<arg_key>{k}</arg_key>{sep}<arg_value>{v}</arg_value>" for k, v in pairs)
    return f"<tool_call>{name}{body}{sep}</tool_call>"
