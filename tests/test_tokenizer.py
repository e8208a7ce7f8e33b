"""Tokenizer: ids and decoding equal transformers'; special tokens as protocol section 1 says."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from glmv.errors import ChatTemplateError, TokenizerError
from glmv.tiny.variants import SPECS
from glmv.tokenizer import REQUIRED_TOKENS, Tokenizer
from tests.conftest import GLM45_LAYOUT, VARIANTS, copy_checkpoint
from tests.test_chat_template import CASES, render_case

# Text that exercises the byte-level BPE: CJK, emoji (4-byte UTF-8), code, odd whitespace, digits,
# special-token strings glued to words and near-misses that must stay ordinary text.
TEXTS = [
    "Hello, world!",
    "你好，世界。这张图片中有什么？",
    "😀🚗 🐱✅ ★→© 👩‍👩‍👧",
    "def main():\n    return 0\n\n\n",
    "  leading and trailing spaces  \t\r\n",
    "1234567890 3.14159 -42",
    "abc<|image|>def<|begin_of_box|>[[12, 34, 56, 78]]<|end_of_box|>",
    "<think>Let me think.</think>答案是 42<|user|>",
    "<|imag|> <think <think/> [gMASK <sop",
    "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n</tool_call>",
    "Q/nothink",
    "<answer>A</answer>",
]


@pytest.fixture(scope="module")
def ours(tiny_checkpoint: Any) -> Any:
    cache: dict[str, Tokenizer] = {}

    def get(variant: str) -> Tokenizer:
        if variant not in cache:
            cache[variant] = Tokenizer.from_pretrained(tiny_checkpoint(variant))
        return cache[variant]

    return get


def _config(ckpt: Path, name: str = "config.json") -> dict[str, Any]:
    return json.loads((ckpt / name).read_text("utf-8"))


# ------------------------------------------------------------------------------ token ids


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_rendered_prompts_matches_transformers(variant: str, case: Any, ours: Any,
                                                      hf_tokenizer: Any) -> None:
    text = render_case(variant, case)
    ids = ours(variant).encode(text)
    assert ids == hf_tokenizer(variant)(text, add_special_tokens=False).input_ids
    special = ours(variant).special
    assert ids[:2] == [ours(variant).token_to_id("[gMASK]"), ours(variant).token_to_id("<sop>")]
    assert ids.count(special.image) == text.count("<|image|>")
    assert ours(variant).decode(ids) == text


@pytest.mark.parametrize("variant", VARIANTS)
def test_encode_decode_matches_transformers(variant: str, ours: Any, hf_tokenizer: Any) -> None:
    tok, hf = ours(variant), hf_tokenizer(variant)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == text  # byte-level BPE round-trips any text
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip), (text, skip)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_random_ids_matches_transformers(variant: str, ours: Any, hf_tokenizer: Any) -> None:
    # Random ids include partial UTF-8 sequences and special tokens in odd places.
    tok, hf = ours(variant), hf_tokenizer(variant)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 24))]
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip), (ids, skip)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_added_token_is_one_id_equal_to_transformers(variant: str, ours: Any,
                                                           hf_tokenizer: Any) -> None:
    tok, hf = ours(variant), hf_tokenizer(variant)
    for content, _ in SPECS[variant].added_tokens:
        token_id = tok.token_to_id(content)
        assert token_id is not None and token_id == hf.convert_tokens_to_ids(content), content
        assert tok.encode(content) == [token_id], content  # never split by the BPE
        assert tok.id_to_token(token_id) == content
    assert tok.special_ids == set(hf.all_special_ids)


SPECIAL_FIELDS = {
    "image": "<|image|>", "video": "<|video|>", "begin_of_image": "<|begin_of_image|>",
    "end_of_image": "<|end_of_image|>", "begin_of_video": "<|begin_of_video|>",
    "end_of_video": "<|end_of_video|>", "think": "<think>", "end_think": "</think>",
    "user": "<|user|>", "assistant": "<|assistant|>", "observation": "<|observation|>",
    "endoftext": "<|endoftext|>", "begin_of_box": "<|begin_of_box|>",
    "end_of_box": "<|end_of_box|>", "tool_call": "<tool_call>", "end_tool_call": "</tool_call>",
    "answer": "<answer>", "end_answer": "</answer>",
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_special_ids_equal_transformers_and_config(variant: str, ours: Any, hf_tokenizer: Any,
                                                   tiny_checkpoint: Any) -> None:
    tok, hf = ours(variant), hf_tokenizer(variant)
    special = tok.special
    for name, content in SPECIAL_FIELDS.items():
        expected = hf.convert_tokens_to_ids(content)
        if content in {c for c, _ in SPECS[variant].added_tokens}:
            assert getattr(special, name) == expected, name
        else:
            assert getattr(special, name) is None, name
    ckpt = tiny_checkpoint(variant)
    cfg = _config(ckpt)
    assert cfg["image_token_id"] == cfg["text_config"]["image_token_id"] == special.image
    assert cfg["video_token_id"] == cfg["text_config"]["video_token_id"] == special.video
    assert cfg["image_start_token_id"] == special.begin_of_image
    assert cfg["image_end_token_id"] == special.end_of_image
    assert cfg["video_start_token_id"] == special.begin_of_video
    assert cfg["video_end_token_id"] == special.end_of_video
    stops = [special.endoftext, special.user, special.observation]
    if variant == "glm-4.1v-thinking":
        stops.append(special.end_answer)
    assert cfg["text_config"]["eos_token_id"] == stops
    assert _config(ckpt, "generation_config.json")["eos_token_id"] == stops
    assert cfg["text_config"]["pad_token_id"] == special.endoftext == tok.eos_token_id
    assert tok.vocab_size <= cfg["text_config"]["vocab_size"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_skip_special_tokens_keeps_tags_drops_roles_and_media(variant: str, ours: Any,
                                                              hf_tokenizer: Any) -> None:
    tok = ours(variant)
    kept = ["<think>", "</think>"]
    dropped = ["<|user|>", "<|assistant|>", "<|observation|>", "<|system|>", "<|image|>",
               "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|endoftext|>", "[gMASK]"]
    if variant in GLM45_LAYOUT:
        kept += ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                 "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink"]
        dropped += ["<|begin_of_box|>", "<|end_of_box|>"]
    else:
        kept += ["<answer>", "</answer>"]
    for token in kept:
        ids = tok.encode(f"a{token}b")
        assert tok.decode(ids, skip_special_tokens=True) == f"a{token}b", token
        assert tok.token_to_id(token) not in tok.special_ids
    for token in dropped:
        ids = tok.encode(f"a{token}b")
        assert tok.decode(ids, skip_special_tokens=True) == "ab", token
        assert tok.decode(ids, skip_special_tokens=False) == f"a{token}b", token
        assert tok.token_to_id(token) in tok.special_ids


def test_glm41v_layout_has_answer_tags_and_answer_stop(ours: Any, tiny_checkpoint: Any) -> None:
    tok = ours("glm-4.1v-thinking")
    assert tok.special.answer is not None and tok.special.end_answer is not None
    assert tok.encode("<answer>A</answer>") == [tok.special.answer, *tok.encode("A"),
                                                tok.special.end_answer]
    eos = _config(tiny_checkpoint("glm-4.1v-thinking"))["text_config"]["eos_token_id"]
    assert tok.special.end_answer in eos
    # No GLM-4.5 tool tags or /nothink in the GLM-4-0414 layout.
    assert tok.special.tool_call is None and tok.token_to_id("/nothink") is None
    # ... and the GLM-4.5 layout has no answer tags.
    assert ours("glm-4.5v").special.answer is None


@pytest.mark.parametrize("variant", GLM45_LAYOUT)
def test_nothink_is_one_token(variant: str, ours: Any, hf_tokenizer: Any) -> None:
    tok = ours(variant)
    nothink = tok.token_to_id("/nothink")
    assert nothink is not None
    assert tok.encode("/nothink") == [nothink]
    ids = tok.encode("Q2/nothink<|assistant|>")
    assert ids[-2:] == [nothink, tok.special.assistant]
    assert hf_tokenizer(variant)("/nothink", add_special_tokens=False).input_ids == [nothink]


@pytest.mark.parametrize("variant", VARIANTS)
def test_newline_is_one_token(variant: str, ours: Any, hf_tokenizer: Any) -> None:
    tok = ours(variant)
    assert tok.encode("\n") == [tok.special.newline]
    assert hf_tokenizer(variant)("\n", add_special_tokens=False).input_ids == [tok.special.newline]
    assert tok.encode("<|user|>\n") == [tok.special.user, tok.special.newline]
    assert tok.encode("<|assistant|>\n<think></think>\n") == [
        tok.special.assistant, tok.special.newline, tok.special.think, tok.special.end_think,
        tok.special.newline]


def test_required_tokens_are_in_every_layout(ours: Any) -> None:
    for variant in VARIANTS:
        tok = ours(variant)
        assert all(tok.token_to_id(t) is not None for t in REQUIRED_TOKENS)


# --------------------------------------------------------------------------------- errors


def test_missing_tokenizer_json(tiny_checkpoint: Any, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint("glm-4.5v"), tmp_path / "ck")
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"tokenizer\.json not found"):
        Tokenizer.from_pretrained(ckpt)
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_pretrained(tmp_path / "does-not-exist")


def test_corrupt_tokenizer_files(tiny_checkpoint: Any, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint("glm-4.5v"), tmp_path / "ck")
    good = (ckpt / "tokenizer.json").read_text("utf-8")
    (ckpt / "tokenizer.json").write_text(good[: len(good) // 2], "utf-8")
    with pytest.raises(TokenizerError, match="cannot be loaded"):
        Tokenizer.from_pretrained(ckpt)
    (ckpt / "tokenizer.json").write_text(good, "utf-8")
    (ckpt / "tokenizer_config.json").write_text("{not json", "utf-8")
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_pretrained(ckpt)
    (ckpt / "tokenizer_config.json").write_text("[1, 2]", "utf-8")
    with pytest.raises(TokenizerError, match="JSON object"):
        Tokenizer.from_pretrained(ckpt)


@pytest.mark.parametrize("token", ["<|image|>", "<think>"])
def test_tokenizer_missing_a_glmv_token(token: str, tiny_checkpoint: Any, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint("glm-4.6v"), tmp_path / "ck")
    data = json.loads((ckpt / "tokenizer.json").read_text("utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != token]
    (ckpt / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), "utf-8")
    with pytest.raises(TokenizerError, match=f"lacks the GLM-V tokens.*{re.escape(repr(token))}"):
        Tokenizer.from_pretrained(ckpt)


def test_no_chat_template(tiny_checkpoint: Any, tmp_path: Path) -> None:
    ckpt = copy_checkpoint(tiny_checkpoint("glm-4.6v-flash"), tmp_path / "ck")
    source = (ckpt / "chat_template.jinja").read_text("utf-8")
    (ckpt / "chat_template.jinja").unlink()
    tok = Tokenizer.from_pretrained(ckpt)
    assert tok.chat_template is None
    msgs = [{"role": "user", "content": "Hello"}]
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.render_chat(msgs)
    # An explicit template still works ...
    expected = "[gMASK]<sop><|user|>\nHello<|assistant|>\n"
    assert tok.render_chat(msgs, chat_template_source=source) == expected
    # ... and the older `chat_template` key of tokenizer_config.json is honoured.
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text("utf-8"))
    cfg["chat_template"] = source
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg), "utf-8")
    assert Tokenizer.from_pretrained(ckpt).render_chat(msgs) == expected
