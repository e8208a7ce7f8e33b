"""Property tests (hypothesis) on arbitrary input: the multimodal processor and the output
parsers return, or raise a typed error (a `glmv.errors.GlmvError` subclass), never anything else.

- the processor (`MultiModalProcessor.process_chat`, `process`): arbitrary bytes as an image,
  a video or a document -- random bytes, and random bytes behind the magic number of every
  format glmv sniffs (PNG, JPEG, GIF, WebP, TIFF, BMP, MP4, MOV, MKV, AVI, PDF, ZIP, OLE2...),
  by data URL, raw bytes and base64 `file_data`; arbitrary OpenAI-style messages: random
  nesting of dicts / lists / strings / numbers in `content` and its parts, unknown part types,
  bad URLs (no network: the policy allows one domain that is never generated), local paths
  inside and outside the allowed folder, odd image options; arbitrary tools and
  chat_template_kwargs;
- the parsers (`parse_completion`, `StreamingParser`): tests/parsing already feeds them
  arbitrary text with random tags and random splits, with a fixed tool list; here the tools
  themselves are arbitrary JSON (any shape of `parameters` schema), with arbitrary
  tool_choice, image sizes and prefill; and `convert_argument` gets arbitrary schemas;
- the chat route in process (scripted replies, no model): request bodies with the structure
  the OpenAPI schema leaves open (messages, parts, tools, tool_choice), never a 5xx.

Hypothesis is derandomized: every run tries the same inputs. A longer run, by hand:

    GLMV_PROPERTY_SCALE=20 pytest -p no:cacheprovider tests/reliability/test_properties.py
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmv.errors import GlmvError
from glmv.multimodal.media import MediaPolicy
from glmv.multimodal.processor import MultiModalProcessor
from glmv.parsing import ParserConfig, StreamingParser, parse_completion
from glmv.parsing.tags import NAME_TERMINATORS, OUTPUT_TAGS
from glmv.parsing.tool_args import ToolSchemas, convert_argument, schema_types
from tests.multimodal.media_helpers import processor

#: The only domain media URLs may come from; never generated, so nothing is fetched.
ALLOWED_DOMAIN = "media.invalid"


#: Multiplies every test's number of examples, for a longer run by hand.
SCALE = float(os.environ.get("GLMV_PROPERTY_SCALE", "1"))


def fuzz_settings(max_examples: int) -> settings:
    return settings(max_examples=max(1, round(max_examples * SCALE)), derandomize=True,
                    database=None, deadline=None,
                    print_blob=False,
                    suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.large_base_example))


def returns_or_typed_error(call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """`call` returns, or raises a GlmvError; any other exception fails the test."""
    with contextlib.suppress(GlmvError):
        call(*args, **kwargs)


# ------------------------------------------------------------------------------ strategies

#: Magic numbers of the formats glmv tells apart (glmv/multimodal/sniff.py), some with the
#: bytes right after them that the sniffer also reads.
MAGIC = [
    b"\x89PNG\r\n\x1a\n", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8\xff",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", b"GIF87a", b"GIF89a", b"RIFF\x00\x10\x00\x00WEBPVP8 ",
    b"RIFF\x00\x10\x00\x00WEBPVP8L", b"RIFF\x00\x10\x00\x00WEBPVP8X", b"II*\x00", b"MM\x00*",
    b"BM" + bytes(12) + struct.pack("<I", 40), b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00",
    b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00", b"\x00\x00\x00\x14ftypqt  ",
    b"\x00\x00\x00\x1cftypavif", b"\x1aE\xdf\xa3", b"\x1aE\xdf\xa3\x9fB\x82\x84webm",
    b"RIFF\x00\x10\x00\x00AVI LIST", b"FLV\x01", b"\x00\x00\x01\xba", b"\x00\x00\x01\xb3",
    b"\x47" + bytes(187) + b"\x47", b"%PDF-1.7\n", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>",
    b"PK\x03\x04", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", b"OggS", b"ID3", b"\x1f\x8b", b"<svg",
    b"<!DOCTYPE html>",
]
media_bytes = st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda magic, tail: magic + tail, st.sampled_from(MAGIC), st.binary(max_size=2048)),
)
MIME = ["image/png", "image/jpeg", "video/mp4", "application/pdf", "application/octet-stream",
        "text/plain", "", "image/png;charset=utf-8"]


def _data_url(data: bytes, mime: str, encoding: str) -> str:
    if encoding == "base64":
        return f"data:{mime};base64," + base64.b64encode(data).decode()
    if encoding == "plain":  # percent-encoded, no base64
        return f"data:{mime}," + "".join(f"%{b:02x}" for b in data[:256])
    return f"data:{mime};base64," + data.decode("latin-1")  # not base64 at all


data_urls = st.builds(_data_url, media_bytes, st.sampled_from(MIME),
                      st.sampled_from(["base64", "base64", "plain", "raw"]))
HOSTS = ["example.com", "127.0.0.1", "[::1]", "169.254.169.254", "localhost", "xn--n3h.com",
         "user:pw@example.org", "example.com:0", "example.com:99999", "a" * 300, "", "%00",
         "bücher.de", "exa mple.com", "[::ffff:10.0.0.1]", "0x7f.1"]
text_bits = st.text(max_size=30)
urls = st.one_of(
    data_urls,
    st.builds(lambda scheme, host, path: f"{scheme}://{host}/{path}",
              st.sampled_from(["http", "https", "ftp", "file", "gopher", "HTTP", "javascript"]),
              st.sampled_from(HOSTS), text_bits),
    st.sampled_from(["data:", "data:,", "data:image/png;base64", "data:;base64,====",
                     "http://", "https:///x.png", "file:///etc/passwd", "file://host/x.png",
                     "/etc/passwd", "../../etc/passwd", "relative.png", "", " ", "\x00",
                     "~/x.png", "C:\\x.png", "//example.com/x.png"]),
    text_bits,
)
json_leaves = st.one_of(st.none(), st.booleans(), st.integers(),
                        st.floats(allow_nan=True, allow_infinity=True), text_bits)
json_values = st.recursive(
    json_leaves,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(text_bits, children, max_size=4)),
    max_leaves=12)
PART_TYPES = ["text", "image_url", "input_image", "image", "image_pil", "video_url", "video",
              "file", "input_file", "input_text", "audio", "tool_result", ""]
image_options = st.fixed_dictionaries({}, optional={
    "detail": st.one_of(st.sampled_from(["low", "high", "auto", "x"]), json_leaves),
    "min_pixels": st.one_of(st.integers(-10, 10**12), json_leaves),
    "max_pixels": st.one_of(st.integers(-10, 10**12), json_leaves),
})


def _media_part(kind: str, source: Any, wrap: bool, options: dict[str, Any]) -> dict[str, Any]:
    value = {"url": source, **options} if wrap else source
    return {"type": kind, kind: value, **({} if wrap else options)}


def _file_part(data: bytes, filename: Any, as_data_url: bool) -> dict[str, Any]:
    encoded = (_data_url(data, "application/pdf", "base64") if as_data_url
               else base64.b64encode(data).decode())
    return {"type": "file", "file": {"file_data": encoded, "filename": filename}}


parts = st.one_of(
    text_bits,
    st.builds(lambda text: {"type": "text", "text": text}, json_values),
    st.builds(_media_part, st.sampled_from(["image_url", "input_image", "image", "video_url",
                                            "video"]),
              st.one_of(urls, json_values), st.booleans(), image_options),
    st.builds(_file_part, media_bytes, json_leaves, st.booleans()),
    st.builds(lambda body: {"type": "file", "file": body}, json_values),
    st.builds(lambda kind, body: {"type": kind, **body}, st.sampled_from(PART_TYPES),
              st.dictionaries(st.sampled_from([*PART_TYPES, "url", "file_data", "text"]),
                              st.one_of(urls, json_values), max_size=3)),
    json_values,
)
tool_call_values = st.one_of(
    json_values,
    st.builds(lambda name, args: {"type": "function", "function": {"name": name,
                                                                    "arguments": args}},
              json_leaves, st.one_of(text_bits, json_values,
                                     st.sampled_from(['{"a": 1}', "{", "[]", "null", ""]))),
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.one_of(st.sampled_from(["system", "developer", "user", "assistant",
                                            "tool"]), json_leaves)},
        optional={
            "content": st.one_of(st.none(), text_bits, st.lists(parts, max_size=4),
                                 json_values),
            "tool_calls": st.one_of(st.lists(tool_call_values, max_size=2), json_values),
            "reasoning_content": json_leaves,
            "name": json_leaves,
            "tool_call_id": json_leaves,
            "extra": json_values,
        }),
    min_size=1, max_size=4)
tools = st.one_of(
    st.none(),
    st.lists(st.one_of(
        json_values,
        st.builds(lambda name, params: {"type": "function", "function": {
            "name": name, "description": "d", "parameters": params}}, json_leaves, json_values),
    ), max_size=3),
)
template_kwargs = st.one_of(
    st.none(),
    st.dictionaries(st.one_of(st.sampled_from(["enable_thinking", "tools", "messages",
                                               "add_generation_prompt", "documents", "source",
                                               "chat_template_source"]), text_bits),
                    json_values, max_size=3),
)


# ------------------------------------------------------------------------------ processor


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("allowed-media")
    (folder / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "sub").mkdir()
    return folder


@pytest.fixture(scope="module", params=["glm-4.6v", "glm-4.1v-thinking"])
def proc(request: pytest.FixtureRequest, tiny_checkpoint: Callable[..., Path],
         media_folder: Path) -> MultiModalProcessor:
    policy = MediaPolicy(allowed_local_paths=(str(media_folder),),
                         allowed_domains=(ALLOWED_DOMAIN,), timeout_s=2.0,
                         max_image_pixels=4_000_000, max_document_pages=4, office_timeout_s=5.0)
    return processor(tiny_checkpoint(request.param), policy)


@fuzz_settings(150)
@given(data=media_bytes, modality=st.sampled_from(["image", "video", "document"]),
       via=st.sampled_from(["data URL", "bytes", "base64"]))
def test_arbitrary_bytes_as_media(proc: MultiModalProcessor, data: bytes, modality: str,
                                  via: str) -> None:
    if via == "bytes" and modality != "document":
        placeholder = ("<|begin_of_image|><|image|><|end_of_image|>" if modality == "image"
                       else "<|begin_of_video|><|video|><|end_of_video|>")
        media = {"images": [data]} if modality == "image" else {"videos": [data]}
        returns_or_typed_error(proc.process, placeholder + "What is it?", **media)
        return
    if modality == "document":
        part = _file_part(data, "x.pdf", as_data_url=via == "data URL")
    else:
        key = "image_url" if modality == "image" else "video_url"
        part = {"type": key, key: {"url": _data_url(data, "image/png", "base64")}}
    returns_or_typed_error(proc.process_chat, [{"role": "user", "content": [
        part, {"type": "text", "text": "What is it?"}]}])


@fuzz_settings(300)
@given(messages=messages, tools=tools, kwargs=template_kwargs,
       add_generation_prompt=st.booleans(), prefill=st.sampled_from(["", "<tool_call>", "x"]))
def test_arbitrary_messages(proc: MultiModalProcessor, messages: list[dict[str, Any]],
                            tools: list[Any] | None, kwargs: dict[str, Any] | None,
                            add_generation_prompt: bool, prefill: str) -> None:
    returns_or_typed_error(proc.process_chat, messages, tools=tools, chat_template_kwargs=kwargs,
                           add_generation_prompt=add_generation_prompt,
                           assistant_prefill=prefill)


@fuzz_settings(100)
@given(source=st.one_of(urls, json_values), options=image_options)
def test_arbitrary_image_sources_and_options(proc: MultiModalProcessor, media_folder: Path,
                                             source: Any, options: dict[str, Any]) -> None:
    for candidate in (source, str(media_folder / "junk.png"), str(media_folder / "sub"),
                      str(media_folder / "empty.mp4")):
        part = {"type": "image_url", "image_url": {"url": candidate, **options}}
        returns_or_typed_error(proc.process_chat, [{"role": "user", "content": [part]}])


@fuzz_settings(100)
@given(ids=st.lists(st.one_of(st.integers(), st.integers(0, 2000)), max_size=20))
def test_arbitrary_token_ids(proc: MultiModalProcessor, ids: list[int]) -> None:
    returns_or_typed_error(proc.process_token_ids, ids)


# ------------------------------------------------------------------------------ parsers

CONFIGS = {"glm41v": ParserConfig.for_model("glm4v", has_answer_tags=True),
           "glm45": ParserConfig.for_model("glm4v_moe", has_answer_tags=False)}
FRAGMENTS = [*OUTPUT_TAGS, *NAME_TERMINATORS, *(tag[:n] for tag in OUTPUT_TAGS for n in (1, 3)),
             "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
             "</arg_value>", "f", "g", "a", "b", "x", "1", "-2.5e308", "null", "true", "[", "]",
             "{", "}", '"', ",", ":", "\n", " ", "\\", "[[1,2,3,4]]", "(1,2),(3,4)", "北京", "🌧"]
completions = st.one_of(st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
                        st.text(max_size=100))
def _schema_nodes(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Schema objects and lists whose members are `children`."""
    return st.one_of(
        st.fixed_dictionaries({}, optional={
            "properties": st.dictionaries(st.sampled_from(["a", "b", "x", ""]), children,
                                          max_size=3),
            "items": children, "anyOf": st.lists(children, max_size=3),
            "oneOf": children, "allOf": st.lists(children, max_size=2),
            "additionalProperties": children}),
        st.lists(children, max_size=3))


schemas = st.recursive(
    st.one_of(json_leaves, st.fixed_dictionaries({}, optional={
        "type": st.one_of(st.sampled_from(["string", "integer", "number", "boolean", "null",
                                           "array", "object", "date"]),
                          st.lists(st.sampled_from(["integer", "null", "string"]), max_size=3),
                          json_leaves),
        "enum": json_values, "const": json_values})),
    _schema_nodes, max_leaves=10)
parser_tools = st.one_of(  # a list of anything (the server's tools are a list of objects)
    st.none(),
    st.lists(st.one_of(
        json_values,
        st.builds(lambda name, params: {"type": "function", "function": {"name": name,
                                                                         "parameters": params}},
                  st.one_of(st.sampled_from(["f", "g", ""]), json_leaves), schemas),
        st.builds(lambda name, params: {"name": name, "parameters": params},
                  st.sampled_from(["f", "g"]), schemas),
    ), max_size=3),
)
parser_kwargs = st.fixed_dictionaries({
    "enable_thinking": st.booleans(),
    "tools": parser_tools,
    "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]),
                             st.dictionaries(text_bits, json_values, max_size=2),
                             st.builds(lambda name: {"type": "function",
                                                     "function": {"name": name}}, json_values)),
    "image_sizes": st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 10**6)),
                            max_size=3),
    "keep_box_tokens": st.booleans(),
    "prefill": st.one_of(st.sampled_from(["", "<think></think>\n", "<tool_call>",
                                          "<tool_call>f\n", "<think>"]), completions),
})


def _parse_whole_and_streamed(text: str, config: ParserConfig, kwargs: dict[str, Any],
                              cuts: list[int]) -> None:
    parse_completion(text, config, **kwargs)
    parser = StreamingParser(config, **kwargs)
    start = 0
    for cut in sorted({min(c, len(text)) for c in cuts}):
        parser.feed(text[start:cut])
        start = cut
    parser.feed(text[start:])
    parser.finish()
    parser.result()


@fuzz_settings(400)
@given(text=completions, model=st.sampled_from(sorted(CONFIGS)), kwargs=parser_kwargs,
       cuts=st.lists(st.integers(0, 120), max_size=8))
def test_parsers_with_arbitrary_tools(text: str, model: str, kwargs: dict[str, Any],
                                      cuts: list[int]) -> None:
    returns_or_typed_error(_parse_whole_and_streamed, text, CONFIGS[model], kwargs, cuts)


def _convert(raw: str, schema: Any, tools: Any) -> None:
    value = convert_argument(raw, schema)
    if isinstance(value, float):
        assert math.isfinite(value)
    if isinstance(schema, dict):
        schema_types(schema)
    ToolSchemas(tools).property_schema("f", "a")


@fuzz_settings(300)
@given(raw=completions, schema=schemas, tools=parser_tools)
def test_argument_conversion_with_arbitrary_schemas(raw: str, schema: Any, tools: Any) -> None:
    returns_or_typed_error(_convert, raw, schema if isinstance(schema, dict) else None, tools)


def test_self_referencing_tools_do_not_loop() -> None:
    schema: dict[str, Any] = {"type": "object", "properties": {}}
    schema["properties"]["a"] = schema
    schema["anyOf"] = [schema]
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    text = "<tool_call>f\n<arg_key>a</arg_key>\n<arg_value>{\"a\": 1}</arg_value>\n</tool_call>"
    for config in CONFIGS.values():
        returns_or_typed_error(_parse_whole_and_streamed, text, config,
                               {"tools": tools, "tool_choice": "auto"}, [5, 30])


# ------------------------------------------------------------------------------ chat route

chat_bodies = st.fixed_dictionaries(
    {"messages": messages},
    optional={
        "tools": st.lists(st.one_of(
            st.dictionaries(text_bits, json_values, max_size=3),
            st.builds(lambda name, params: {"type": "function", "function": {
                "name": name, "parameters": params}}, st.sampled_from(["f", "g"]), schemas),
            st.builds(lambda function: {"type": "function", "function": function},
                      json_values)), max_size=3),
        "tool_choice": parser_kwargs.map(lambda kwargs: kwargs["tool_choice"]),
        "chat_template_kwargs": st.dictionaries(
            st.sampled_from(["enable_thinking", "tools", "x"]), json_values, max_size=2),
        "stream": st.booleans(),
        "stream_options": st.just({"include_usage": True}),
        "n": st.integers(1, 3),
        "skip_special_tokens": st.booleans(),
        "logprobs": st.booleans(),
        "top_logprobs": st.integers(0, 3),
        "max_tokens": st.integers(1, 64),
    })


@pytest.fixture(scope="module")
def scripted_client(tiny_checkpoint: Callable[..., Path]) -> Iterator[Any]:
    from tests.server.conftest import start_client

    with contextlib.ExitStack() as stack:
        yield start_client(stack, tiny_checkpoint, "glm-4.6v", scripted=True,
                           allowed_domains=(ALLOWED_DOMAIN,), timeout_s=2.0)


@fuzz_settings(150)
@given(body=chat_bodies, reply=completions)
def test_chat_route_on_arbitrary_bodies(scripted_client: Any, body: dict[str, Any],
                                        reply: str) -> None:
    """The server's own checks, the processor and the parsers together, on request bodies with
    the structure the schema leaves open (messages, content parts, tools, tool_choice), and a
    scripted reply with random tags: never a 5xx, in the status or in a stream's events."""
    scripted_client.app.state.ctx.engine.replies = [reply or "ok"]
    # NaN and Infinity as Python's json writes them (not strict JSON; the server's parser
    # reads them).
    response = scripted_client.post("/v1/chat/completions", content=json.dumps(body),
                                    headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    if body.get("stream") and response.status_code == 200:
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                error = json.loads(line[6:]).get("error")
                assert error is None or error["code"] < 500, error


def test_what_these_properties_found(proc: MultiModalProcessor) -> None:
    # Each raised TypeError/AttributeError before: tool_calls that are not a list, a tool
    # call whose function is not an object, chat_template_kwargs naming the renderer's own
    # arguments, a tool schema with `"oneOf": true`.
    for message in ({"role": "assistant", "tool_calls": 1.0},
                    {"role": "assistant", "tool_calls": [{"function": [1]}]},
                    {"role": "assistant", "tool_calls": [{"function": "f"}]}):
        with pytest.raises(GlmvError):
            proc.process_chat([{"role": "user", "content": "x"}, message])
    with pytest.raises(GlmvError, match="may not set"):
        proc.process_chat([{"role": "user", "content": "x"}],
                          chat_template_kwargs={"tools": [], "messages": []})
    assert convert_argument("12", {"oneOf": True, "enum": 5, "anyOf": "ab"}) == 12
