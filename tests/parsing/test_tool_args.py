"""Argument values typed by the tool's JSON schema (tool_args.convert_argument), through the
whole parse and directly."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from glmv.parsing import parse_completion
from glmv.parsing.tool_args import ToolSchemas, convert_argument, schema_types
from tests.parsing.cases import GLM45, call

PROPERTIES: dict[str, Any] = {
    "s": {"type": "string"},
    "i": {"type": "integer"},
    "n": {"type": "number"},
    "b": {"type": "boolean"},
    "z": {"type": "null"},
    "o": {"type": "object", "properties": {"inner": {"type": "object",
                                                     "properties": {"k": {"type": "string"}}}}},
    "a": {"type": "array", "items": {"type": "integer"}},
    "e": {"type": "string", "enum": ["red", "green"]},
    "e_untyped": {"enum": ["red", "green"]},
    "e_int": {"enum": [1, 2, 3]},
    "any_int_null": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
    "any_str_null": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    "one_str_arr": {"oneOf": [{"type": "string"}, {"type": "array"}]},
    "all_num": {"allOf": [{"type": "number"}, {"minimum": 0}]},
    "list_int_str": {"type": ["integer", "string"]},
    "list_bool_null": {"type": ["boolean", "null"]},
    "const": {"const": 5},
    "props_only": {"properties": {"x": {}}},
    "items_only": {"items": {}},
    "no_type": {"description": "anything"},
    "bad_type": {"type": "datetime"},
}
TOOL = {"type": "function", "function": {"name": "t", "parameters": {
    "type": "object", "properties": PROPERTIES}}}

# (key, raw value as the model writes it, expected Python value: type and value both checked)
TYPED = [
    # string: the stripped raw text, however it looks
    ("s", "hello", "hello"),
    ("s", "  padded \n", "padded"),
    ("s", "123", "123"),
    ("s", "1.5", "1.5"),
    ("s", "true", "true"),
    ("s", "null", "null"),
    ("s", '{"a": 1}', '{"a": 1}'),
    ("s", "[1, 2]", "[1, 2]"),
    ("s", '"quoted"', '"quoted"'),
    ("s", "", ""),
    # integer / number
    ("i", "42", 42),
    ("i", " -7 ", -7),
    ("i", '"42"', 42),
    ("i", "3.0", 3),
    ("i", "1e3", 1000),
    ("i", "2.5", 2.5),  # parses but is no integer: kept as parsed
    ("i", "true", True),  # the same: what the model wrote, for the client to reject
    ("i", "abc", "abc"),  # does not parse: the raw text
    ("i", "12abc", "12abc"),
    ("i", "", ""),
    ("i", "1_000", 1000),  # Python literal (ast.literal_eval fallback)
    ("i", "123456789012345678901234567890", 123456789012345678901234567890),
    ("n", "2.5", 2.5),
    ("n", "3", 3),
    ("n", "3.0", 3.0),
    ("n", '"2.5"', 2.5),
    ("n", "NaN", "NaN"),  # not strict JSON: the raw text
    ("n", "Infinity", "Infinity"),
    ("n", "1e999", "1e999"),
    ("n", '"nan"', "nan"),
    # boolean / null
    ("b", "true", True),
    ("b", "false", False),
    ("b", "True", True),
    ("b", "False", False),
    ("b", "yes", "yes"),
    ("z", "null", None),
    ("z", "None", None),
    ("z", "nothing", "nothing"),
    # object / array, nested values as written
    ("o", '{"inner": {"k": 1, "l": [1, {"m": null}]}}', {"inner": {"k": 1, "l": [1, {"m": None}]}}),
    ("o", "{'inner': {'k': True}}", {"inner": {"k": True}}),
    ("o", '{\\"inner\\": {\\"k\\": \\"v\\"}}', {"inner": {"k": "v"}}),  # escaped quotes
    ("o", '{"a": 1', '{"a": 1'),
    ("o", "[1, 2]", [1, 2]),
    ("a", "[1, 2, 3]", [1, 2, 3]),
    ("a", "(1, 2)", [1, 2]),
    ("a", "[]", []),
    ("a", "{1, 2}", "{1, 2}"),  # a Python set is no JSON: the raw text
    ("a", "1, 2", [1, 2]),  # a bare Python tuple
    ("a", "a, b", "a, b"),
    ("a", 'x", "tmp": "[1]', 'x", "tmp": "[1]'),  # no quote injection into the unescape step
    ("a", '[\\"x\\"]', ["x"]),  # ... which still reads escaped quotes
    # enum / anyOf / oneOf / allOf / type lists / const / implied types
    ("e", "red", "red"),
    ("e_untyped", "red", "red"),
    ("e_untyped", "1", "1"),
    ("e_int", "2", 2),
    ("any_int_null", "5", 5),
    ("any_int_null", "null", None),
    ("any_int_null", "x", "x"),
    ("any_str_null", "null", None),
    ("any_str_null", "12", "12"),
    ("any_str_null", "text", "text"),
    ("one_str_arr", "[1]", [1]),
    ("one_str_arr", "plain", "plain"),
    ("one_str_arr", "12", "12"),
    ("all_num", "1.25", 1.25),
    ("list_int_str", "12", 12),
    ("list_int_str", "abc", "abc"),
    ("list_int_str", "[1]", "[1]"),
    ("list_int_str", "true", "true"),
    ("list_bool_null", "true", True),
    ("list_bool_null", "null", None),
    ("const", "5", 5),
    ("props_only", '{"x": 1}', {"x": 1}),
    ("items_only", "[1]", [1]),
    # no type information: json.loads, else the raw text
    ("no_type", "12", 12),
    ("no_type", "abc", "abc"),
    ("no_type", "[1, 2]", [1, 2]),
    ("no_type", '"q"', "q"),
    ("no_type", "True", "True"),
    ("bad_type", "12", 12),
    ("undeclared", "12", 12),
    ("undeclared", "{'a': 1}", "{'a': 1}"),
]


def same(got: Any, want: Any) -> bool:
    """Equal and of the same JSON type (True == 1 and 3 == 3.0 in Python, not in JSON)."""
    return json.dumps(got) == json.dumps(want)


@pytest.mark.parametrize(("key", "raw", "want"), TYPED,
                         ids=[f"{k}={r!r}" for k, r, _ in TYPED])
def test_typed_through_the_parse(key: str, raw: str, want: Any) -> None:
    parsed = parse_completion(call("t", (key, raw)), GLM45, tools=[TOOL])
    [tool_call] = parsed.tool_calls
    got = json.loads(tool_call.arguments)[key]
    assert same(got, want), (got, want)
    assert same(convert_argument(raw, PROPERTIES.get(key)), want)


@pytest.mark.parametrize("raw", ["nan", "inf", "-Infinity", "{1, 2}", "1j", "b'x'",
                                 "[" * 5000, "-" * 9999 + "1", "(" * 300 + ")" * 300,
                                 "9" * 5000, '{"a": ' * 2000])
@pytest.mark.parametrize("key", ["i", "o", "a", "no_type", "s"])
def test_conversion_never_raises_and_stays_strict_json(key: str, raw: str) -> None:
    value = convert_argument(raw, PROPERTIES.get(key))
    text = json.dumps(value, allow_nan=False)  # raises on NaN/Infinity or non-JSON types
    assert not isinstance(value, float) or math.isfinite(value)
    assert json.loads(text) == value


@pytest.mark.parametrize(("schema", "types"), [
    ({"type": "string"}, {"string"}),
    ({"type": ["integer", "null"]}, {"integer", "null"}),
    ({"anyOf": [{"type": "number"}, {"oneOf": [{"type": "boolean"}]}]}, {"number", "boolean"}),
    ({"enum": ["a", 1, 1.5, True, None]}, {"string", "integer", "number", "boolean", "null"}),
    ({"const": [1]}, {"array"}),
    ({"properties": {}}, {"object"}),
    ({"items": {}}, {"array"}),
    ({"type": "object", "items": {}}, {"object"}),
    ({"description": "x"}, set()),
    ({"type": "date"}, set()),
    ({"type": 5, "anyOf": "nope"}, set()),
], ids=["string", "type-list", "nested-combinators", "enum", "const", "properties", "items",
        "declared-wins", "none", "unknown", "malformed"])
def test_schema_types(schema: dict[str, Any], types: set[str]) -> None:
    assert schema_types(schema) == types


def test_self_referencing_schema_gives_up() -> None:
    schema: dict[str, Any] = {"anyOf": []}
    schema["anyOf"].append(schema)
    assert schema_types(schema) == set()
    assert convert_argument("12", schema) == 12


@pytest.mark.parametrize("tools", [
    [TOOL],
    [TOOL["function"]],  # the bare {"name", "parameters"} shape
    [{"type": "function"}, "junk", {"function": {"name": 3}}, TOOL],  # malformed entries skipped
], ids=["openai-shape", "bare-shape", "malformed-entries"])
def test_tool_schemas_lookup(tools: list[Any]) -> None:
    schemas = ToolSchemas(tools)
    assert schemas.property_schema("t", "i") == {"type": "integer"}
    assert schemas.property_schema("t", "missing") is None
    assert schemas.property_schema("other", "i") is None


def test_tool_without_parameters_types_by_json() -> None:
    tools = [{"type": "function", "function": {"name": "bare"}}]
    parsed = parse_completion(call("bare", ("x", "1"), ("y", "two")), GLM45, tools=tools)
    assert json.loads(parsed.tool_calls[0].arguments) == {"x": 1, "y": "two"}
