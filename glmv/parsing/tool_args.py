"""Typing tool-call argument values by the request's JSON schema.

GLM writes every argument value as text: strings raw, everything else as JSON (protocol 3.4).
The schema of the tool's parameter says which reading is meant:

- declared `string` only: the stripped raw text, as written;
- any other declared type(s) (integer, number, boolean, object, array, null, or a mix through
  `type` lists, `anyOf`, `oneOf`, `allOf`, `enum`, `const`, `properties`, `items`): `json.loads`,
  then the unescape-then-json fallback (`{\\"a\\": 1}`), then `ast.literal_eval` (Python-style
  `True`, `'x'`, `(1, 2)`), else the raw text. `integer`/`number` turn a numeric string
  (`"7"`) into a number; `integer` alone turns an integral float (`3.0`) into an int.
  When `string` is one of several types, a parsed value of none of the other types falls back to
  the raw text (`12` for `["boolean", "string"]` stays "12");
- a value that parses but fits none of the declared types (`true` or `2.5` for an integer, `[1]`
  for an object) is kept as parsed: it is what the model wrote, and the client's own validation
  names the problem better than a silent string would; a value that does not parse at all
  (`abc` for an integer) stays the raw text;
- no schema for the tool or the property (unknown tool, undeclared key, no type information):
  `json.loads`, else the raw text.

Every result is JSON-serialisable without NaN/Infinity; anything else (a Python set, `nan`) falls
back to the raw text. Conversion never raises.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from typing import Any

# ast.literal_eval on long inputs is slow and can exhaust the stack; tool values are short.
_LITERAL_EVAL_MAX_LEN = 10_000
_MISSING = object()
# JSON-schema type name -> the Python types json.loads produces for it.
_PY_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list,), "null": (type(None),),
}


class ToolSchemas:
    """Parameter schemas of the request's tools, looked up by tool name and argument key.

    Accepts the OpenAI shape `{"type": "function", "function": {"name", "parameters"}}` and the
    bare `{"name", "parameters"}`; malformed entries are skipped, never raised on.
    """

    def __init__(self, tools: Sequence[Mapping[str, Any]] | None) -> None:
        self._properties: dict[str, Mapping[str, Any]] = {}
        for tool in tools or ():
            if not isinstance(tool, Mapping):
                continue
            function = tool.get("function", tool)
            if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
                continue
            parameters = function.get("parameters")
            props = parameters.get("properties") if isinstance(parameters, Mapping) else None
            self._properties[function["name"]] = props if isinstance(props, Mapping) else {}

    def property_schema(self, tool_name: str, key: str) -> Mapping[str, Any] | None:
        """The schema of argument `key` of `tool_name`, or None when either is unknown."""
        schema = self._properties.get(tool_name, {}).get(key)
        return schema if isinstance(schema, Mapping) else None


def schema_types(schema: Mapping[str, Any], depth: int = 0) -> set[str]:
    """Every JSON type name `schema` admits (empty when it says nothing about types)."""
    if depth > 8:  # self-referencing or absurdly nested schemas: give up on typing
        return set()
    types: set[str] = set()
    declared = schema.get("type")
    if isinstance(declared, str):
        types.add(declared)
    elif isinstance(declared, list):
        types.update(t for t in declared if isinstance(t, str))
    # A request's tools may hold any JSON where a list belongs ("oneOf": true): not a list,
    # nothing to read.
    for combinator in ("anyOf", "oneOf", "allOf"):
        for sub in _list(schema.get(combinator)):
            if isinstance(sub, Mapping):
                types |= schema_types(sub, depth + 1)
    values = _list(schema.get("enum")) + ([schema["const"]] if "const" in schema else [])
    types.update(_json_type(v) for v in values)
    if not types and "properties" in schema:
        types.add("object")
    if not types and "items" in schema:
        types.add("array")
    return types & set(_PY_TYPES)


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else []


def convert_argument(raw_value: str, schema: Mapping[str, Any] | None) -> Any:
    """The typed value of one `<arg_value>` text (see the module docstring for the rules)."""
    text = raw_value.strip()
    types = schema_types(schema) if schema is not None else set()
    if not types:
        value = _json_safe(_loads(text))
        return text if value is _MISSING else value
    if types == {"string"}:
        return text
    value = _parse_value(text)
    if value is _MISSING:
        return text
    if isinstance(value, str) and types & {"integer", "number"}:
        value = _as_number(value)
    if (isinstance(value, float) and value.is_integer() and "integer" in types
            and "number" not in types):
        value = int(value)
    if "string" in types and not _is_one_of(value, types - {"string"}):
        return text
    return value


def _parse_value(text: str) -> Any:
    for parse in (_loads, _loads_unescaped, _literal_eval):
        value = _json_safe(parse(text))
        if value is not _MISSING:
            return value
    return _MISSING


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _MISSING


def _loads_unescaped(text: str) -> Any:
    # A JSON value written with escaped quotes, e.g. {\"a\": 1}: unescape as a JSON string first.
    if "\\" not in text:
        return _MISSING  # nothing to unescape: the plain json.loads already said no
    unescaped = _loads('{"tmp": "' + text + '"}')
    if not isinstance(unescaped, dict) or not isinstance(unescaped.get("tmp"), str):
        return _MISSING
    return _loads(unescaped["tmp"])


def _literal_eval(text: str) -> Any:
    if len(text) > _LITERAL_EVAL_MAX_LEN:
        return _MISSING
    try:
        return ast.literal_eval(text)
    except Exception:  # literal_eval raises ValueError, SyntaxError, MemoryError, RecursionError...
        return _MISSING


def _json_safe(value: Any) -> Any:
    """`value` if it serialises as strict JSON (tuples become lists), else _MISSING."""
    if value is _MISSING:
        return _MISSING
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError):
        return _MISSING


def _as_number(text: str) -> Any:
    for number_type in (int, float):
        try:
            number = number_type(text.strip())
        except ValueError:
            continue
        return number if _json_safe(number) is not _MISSING else text
    return text


def _is_one_of(value: Any, types: set[str]) -> bool:
    for name in types:
        # bool is an int subclass; only "boolean" admits True/False.
        if isinstance(value, bool) and name != "boolean":
            continue
        if isinstance(value, _PY_TYPES[name]):
            return True
    return False


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if value is None:
        return "null"
    return next((name for name, py in _PY_TYPES.items() if isinstance(value, py)), "")
