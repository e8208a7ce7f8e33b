"""GLM tool calls: `<tool_call>NAME\\n<arg_key>K</arg_key>\\n<arg_value>V</arg_value>…</tool_call>`.

Grammar accepted (protocol 3.4), parsed incrementally by `ToolCallBuilder`:

- the name runs to the first newline, the two characters backslash-n, `<arg_key>` or
  `</tool_call>` (so `<tool_call>f</tool_call>`, `<tool_call>f\\n</tool_call>` and
  `<tool_call>f<arg_key>…` all work) and is stripped; newlines before any name are skipped;
- `<arg_key>K</arg_key>` then `<arg_value>V</arg_value>` pairs, anything between them ignored;
  keys are stripped, empty keys are dropped, a repeated key keeps its first value (the streamed
  JSON cannot take an earlier pair back); values are typed by `tool_args.convert_argument`;
- `</tool_call>` ends the call, also inside an unfinished value (the value so far is taken);
  a new `<tool_call>` outside a value ends the current call and opens the next one;
- a call whose name is empty is not a tool call: its raw text goes to the content verbatim.

Arguments stream as consecutive pieces of the final JSON string
`json.dumps(args, ensure_ascii=False)`: `{"city": "北京"` when the first `</arg_value>` arrives,
`, "days": 2` for the next, `}` (or `{}` without arguments) at `</tool_call>`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from enum import Enum
from typing import Any

from glmv.parsing.tags import (
    ARG_KEY_END,
    ARG_KEY_START,
    ARG_VALUE_END,
    ARG_VALUE_START,
    NAME_TERMINATORS,
    OUTPUT_TAGS,
    TOOL_CALL_END,
    TOOL_CALL_START,
)
from glmv.parsing.tool_args import ToolSchemas, convert_argument


@dataclass(frozen=True)
class ToolCall:
    """One complete tool call, in the OpenAI `tool_calls[]` shape."""

    id: str  # "call_" + 24 random hex characters, unique per call
    name: str  # function name as the model wrote it (stripped)
    arguments: str  # json.dumps(arguments, ensure_ascii=False), keys in the model's order


@dataclass(frozen=True)
class ToolCallDelta:
    """A streamed piece of a tool call (OpenAI `delta.tool_calls[]`).

    The first delta of a call carries `id` and `name` (sent once the name is complete); later
    ones carry only argument fragments. Fragments of one index concatenate to the arguments.
    """

    index: int  # position of the call among this completion's tool calls
    id: str | None  # set on the call's first delta only
    name: str | None  # set on the call's first delta only
    arguments: str  # next fragment of the arguments JSON ("" on a name-only delta)


def new_tool_call_id() -> str:
    """A fresh OpenAI-style call id: `call_` + 24 hex characters."""
    return f"call_{secrets.token_hex(12)}"


class _Phase(Enum):
    NAME = "name"  # reading the function name
    BODY = "body"  # between arguments: waiting for <arg_key> or </tool_call>
    KEY = "key"  # inside <arg_key>
    VALUE_WAIT = "value_wait"  # after </arg_key>: waiting for <arg_value>
    VALUE = "value"  # inside <arg_value>


_NAME_TAGS = OUTPUT_TAGS + NAME_TERMINATORS


class ToolCallBuilder:
    """Incremental parser of one tool call, fed the text and tags between `<tool_call>` and
    `</tool_call>` (exclusive of the opening tag).

    Owns the call's raw text (for when it turns out not to be a call), its phase, and the
    arguments parsed so far. Emits ToolCallDeltas only once the call is known to be valid
    (its name is non-empty).
    """

    def __init__(self, index: int, schemas: ToolSchemas) -> None:
        self.index = index  # the index this call gets if it is valid
        self.done = False  # </tool_call> (or an implicit close) was seen
        self._schemas = schemas
        self._phase = _Phase.NAME
        # Text accumulates in lists joined on use: `self.attr += piece` copies the whole string
        # each time, which made long calls (many arguments, long values) quadratic.
        self._raw: list[str] = [TOOL_CALL_START]  # everything seen, tags included, as written
        self._name: list[str] = []
        self._key: list[str] = []
        self._value: list[str] = []
        self._id: str | None = None  # set when the name is complete and non-empty
        self._args: dict[str, Any] = {}
        self._arguments: list[str] = []  # the JSON fragments emitted so far

    @property
    def raw(self) -> str:
        """Everything seen so far, `<tool_call>` and inner tags included, as written."""
        return "".join(self._raw)

    @property
    def name(self) -> str:
        """The function name read so far, stripped."""
        return "".join(self._name).strip()

    @property
    def is_valid(self) -> bool:
        """Whether the name is complete and non-empty (deltas have been or will be emitted)."""
        return self._id is not None

    @property
    def in_value(self) -> bool:
        """Inside `<arg_value>`, where tags other than the closing ones are literal text."""
        return self._phase is _Phase.VALUE

    @property
    def tags(self) -> tuple[str, ...]:
        """The tags to look for in the text that follows."""
        return _NAME_TAGS if self._phase is _Phase.NAME else OUTPUT_TAGS

    def on_text(self, text: str) -> None:
        """Plain text inside the call; between-argument text is ignored."""
        self._raw.append(text)
        if self._phase is _Phase.NAME:
            self._name.append(text)
        elif self._phase is _Phase.KEY:
            self._key.append(text)
        elif self._phase is _Phase.VALUE:
            self._value.append(text)

    def on_tag(self, tag: str) -> list[ToolCallDelta]:
        """A tag inside the call (the caller handles a `<tool_call>` outside a value)."""
        self._raw.append(tag)
        handler = _PHASE_HANDLERS[self._phase]
        return handler(self, tag)

    def close(self) -> list[ToolCallDelta]:
        """End the call: the closing arguments fragment if valid. Idempotent."""
        if self.done:
            return []
        self.done = True
        if self._phase is _Phase.NAME:
            return self._finish_name()  # `<tool_call>f</tool_call>`: a zero-argument call
        if not self.is_valid:
            return []
        return [self._fragment("}" if self._args else "{}")]

    def result(self) -> ToolCall | None:
        """The finished call, or None when it is not a valid, closed call."""
        if not (self.done and self._id is not None):
            return None
        return ToolCall(id=self._id, name=self.name, arguments="".join(self._arguments))

    # ----------------------------------------------------------------- phase handlers

    def _in_name(self, tag: str) -> list[ToolCallDelta]:
        if tag in NAME_TERMINATORS and not self.name:
            return []  # newlines before the name
        if tag in NAME_TERMINATORS or tag == ARG_KEY_START:
            deltas = self._finish_name()
            self._phase = _Phase.KEY if tag == ARG_KEY_START else _Phase.BODY
            return deltas
        if tag == TOOL_CALL_END:
            return self.close()
        self._name.append(tag)  # a literal tag inside the name: garbage, kept as written
        return []

    def _in_body(self, tag: str) -> list[ToolCallDelta]:
        if tag == ARG_KEY_START:
            self._phase, self._key = _Phase.KEY, []
        elif tag == TOOL_CALL_END:
            return self.close()
        return []

    def _in_key(self, tag: str) -> list[ToolCallDelta]:
        if tag == ARG_KEY_END:
            self._phase = _Phase.VALUE_WAIT
        elif tag == TOOL_CALL_END:
            return self.close()  # a key without a value is dropped
        else:
            self._key.append(tag)
        return []

    def _in_value_wait(self, tag: str) -> list[ToolCallDelta]:
        if tag == ARG_VALUE_START:
            self._phase, self._value = _Phase.VALUE, []
        elif tag == ARG_KEY_START:
            self._phase, self._key = _Phase.KEY, []  # the previous key had no value
        elif tag == TOOL_CALL_END:
            return self.close()
        return []

    def _in_value(self, tag: str) -> list[ToolCallDelta]:
        if tag == ARG_VALUE_END:
            self._phase = _Phase.BODY
            return self._add_argument()
        if tag == TOOL_CALL_END:
            return self._add_argument() + self.close()
        self._value.append(tag)
        return []

    # ----------------------------------------------------------------- helpers

    def _finish_name(self) -> list[ToolCallDelta]:
        name = self.name
        if not name:
            return []
        self._id = new_tool_call_id()
        deltas = [ToolCallDelta(self.index, self._id, name, "")]
        if self.done:
            deltas.append(self._fragment("{}"))
        return deltas

    def _add_argument(self) -> list[ToolCallDelta]:
        key = "".join(self._key).strip()
        if not self.is_valid or not key or key in self._args:
            return []
        value = convert_argument("".join(self._value),
                                 self._schemas.property_schema(self.name, key))
        self._args[key] = value
        pair = f"{json.dumps(key, ensure_ascii=False)}: {json.dumps(value, ensure_ascii=False)}"
        return [self._fragment(("{" if len(self._args) == 1 else ", ") + pair)]

    def _fragment(self, text: str) -> ToolCallDelta:
        self._arguments.append(text)
        return ToolCallDelta(self.index, None, None, text)


_PHASE_HANDLERS = {
    _Phase.NAME: ToolCallBuilder._in_name,
    _Phase.BODY: ToolCallBuilder._in_body,
    _Phase.KEY: ToolCallBuilder._in_key,
    _Phase.VALUE_WAIT: ToolCallBuilder._in_value_wait,
    _Phase.VALUE: ToolCallBuilder._in_value,
}
