"""Chat templates rendered in a jinja2 sandbox set up like transformers' `apply_chat_template`.

Same environment (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, the
`{% generation %}` tag), same filters and globals (`tojson` = `json.dumps` with
`ensure_ascii=False`, `raise_exception`, `strftime_now`, `dict`, a namespace that refuses dunder
names), and the same treatment of messages (plain JSON data only, reasoning fields aliased), so a
checkpoint's own template renders here exactly as it does in transformers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from glmv.errors import ChatTemplateError

Message = dict[str, Any]
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# OpenAI content-part types and the template type they stand for.
_MEDIA_PART_TYPES = {
    "image_url": "image", "input_image": "image", "image": "image", "image_pil": "image",
    "video_url": "video", "video": "video",
}


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: accepted and rendered as its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension API declares it this way

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_render_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _render_body(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """A namespace that refuses underscore-prefixed names (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _TemplateDict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


#: The longest string or list a template may build with `*`, and the most bits a power `**`
#: may have: one such expression (`"x" * 10**9`, `10 ** 10 ** 9`) would otherwise hold the
#: interpreter, and so every request of the server, for minutes.
MAX_REPEAT_ITEMS = 1_000_000
MAX_POWER_BITS = 1_000_000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Sandbox(jinja2.sandbox.ImmutableSandboxedEnvironment):
    """transformers' sandbox, with `*` and `**` bounded (a request may send its own template)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any,
                   right: Any) -> Any:
        if operator == "*":
            count, items = (right, left) if _is_int(right) else (left, right)
            if (_is_int(count) and isinstance(items, (str, list, tuple))
                    and len(items) * count > MAX_REPEAT_ITEMS):
                raise jinja2.exceptions.SecurityError(
                    f"the template repeats a sequence to more than {MAX_REPEAT_ITEMS} items")
        if (operator == "**" and _is_int(left) and _is_int(right)
                and abs(left) > 1 and left.bit_length() * right > MAX_POWER_BITS):
            raise jinja2.exceptions.SecurityError(
                f"the template computes a power of more than {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per template text; a syntax error becomes a ChatTemplateError."""
    env = _Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template has a syntax error (line {exc.lineno}): "
                                f"{exc.message}") from exc


def plain_data(value: Any) -> Any:
    """Rebuild `value` from plain JSON types; anything else becomes an inert `<TypeName>`.

    Templates only test whether media keys are present, so decoded images, arrays and tensors
    in content parts are replaced by placeholders before the sandbox sees them.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_data(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return plain_data(value.item())  # numpy scalars; arrays become a placeholder below
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(message: Message) -> Message:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Render one conversation exactly as transformers' `apply_chat_template(tokenize=False)`.

    `template_kwargs` (e.g. `enable_thinking=False`) become template variables.
    """
    template = compile_template(source)
    chat = [plain_data(m) for m in messages]
    for message in chat:
        if not isinstance(message, dict):
            raise ChatTemplateError(f"each message must be an object, got {message!r}")
    # Like transformers: drop None-valued keys (OpenAI sends `content: null` with tool calls),
    # which templates would otherwise print as "None".
    chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in chat]
    try:
        return template.render(
            messages=chat,
            tools=plain_data(list(tools)) if tools is not None else None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **plain_data(template_kwargs),
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
    except (TypeError, AttributeError, LookupError, ValueError, ArithmeticError,
            RecursionError) as exc:
        # What a template can raise on odd data (a request may send its own template): range()
        # over its limit (OverflowError), a macro calling itself, 1 / 0, a missing key.
        raise ChatTemplateError(f"chat template failed on these messages: {exc}") from exc


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[Message]:
    """OpenAI-style messages -> the shape GLM-V templates read (as vLLM prepares them).

    - content parts `image_url` / `input_image` / `video_url` become `{"type": "image"}` /
      `{"type": "video"}` (media stays in the original part for the processor to fetch);
    - tool-call `arguments` given as a JSON string (what OpenAI clients send) become a mapping,
      since the templates iterate over `arguments.items()`.
    """
    out: list[Message] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"each message must be an object, got {message!r}")
        msg = copy.copy(dict(message))
        content = msg.get("content")
        if isinstance(content, list):
            msg["content"] = [_normalize_part(p) for p in content]
        if msg.get("tool_calls"):
            if not isinstance(msg["tool_calls"], list):
                raise ChatTemplateError(f"tool_calls must be a list, got {msg['tool_calls']!r}")
            msg["tool_calls"] = [_normalize_tool_call(tc) for tc in msg["tool_calls"]]
        out.append(msg)
    return out


def _normalize_part(part: Any) -> Any:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, Mapping):
        raise ChatTemplateError(f"content part must be an object or a string, got {part!r}")
    kind = part.get("type")
    if kind in _MEDIA_PART_TYPES:
        # The source stays in the part for the processor; the template only reads `type`.
        return {**part, "type": _MEDIA_PART_TYPES[kind]}
    return dict(part)


def _normalize_tool_call(tool_call: Any) -> Any:
    if not isinstance(tool_call, Mapping):
        raise ChatTemplateError(f"tool_calls entries must be objects, got {tool_call!r}")
    call = dict(tool_call)
    function = call.get("function") or {}
    if not isinstance(function, Mapping):
        raise ChatTemplateError(f"a tool call's function must be an object, got {function!r}")
    fn = dict(function)
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise ChatTemplateError(
                f"tool call {fn.get('name')!r} has arguments that are not valid JSON: {exc}"
            ) from exc
        if not isinstance(fn["arguments"], dict):
            raise ChatTemplateError(f"tool call {fn.get('name')!r} arguments must be an object")
    if fn:
        call["function"] = fn
    return call
