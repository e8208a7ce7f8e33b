"""IncrementalDetokenizer: streamed text equals a whole decode, never a broken character, stop
strings found across token boundaries and never shown before they are cut."""

from __future__ import annotations

import random
from typing import Any

import pytest

from glmv.engine.detokenizer import IncrementalDetokenizer
from glmv.tokenizer import Tokenizer

# Byte-level BPE splits CJK characters and emoji over several tokens.
TEXTS = [
    "Hello, world! How are you today?",
    "你好，世界。这张图片中有什么？答案是 42。",
    "😀🚗 🐱✅ ★→© 👩‍👩‍👧 done",
    "def main():\n    return 0\n\n\n",
    "<think>Let me think.</think>答案是 42<|user|>",
    "<|begin_of_box|>[[12, 34, 56, 78]]<|end_of_box|> 北京",
]


@pytest.fixture(scope="module", params=["glm-4.1v-thinking", "glm-4.5v"])
def tok(request: Any, tiny_checkpoint: Any) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_checkpoint(request.param))


def _stream(tok: Tokenizer, ids: list[int], chunk: int = 1, **kwargs: Any) -> tuple[
        IncrementalDetokenizer, list[str]]:
    """Feed `ids` `chunk` at a time, collecting every delta (the last one flushed)."""
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = []
    for start in range(0, len(ids), chunk):
        detok.update(ids[start:start + chunk])
        deltas.append(detok.get_delta())
    deltas.append(detok.get_delta(finished=True))
    return detok, deltas


def _splits_a_character(tok: Tokenizer, ids: list[int]) -> bool:
    return any("\ufffd" in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("chunk", [1, 2, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_whole_decode_without_broken_characters(
        tok: Tokenizer, text: str, chunk: int, skip: bool) -> None:
    ids = tok.encode(text)
    detok, deltas = _stream(tok, ids, chunk, skip_special_tokens=skip)
    whole = tok.decode(ids, skip_special_tokens=skip)
    assert "".join(deltas) == whole
    assert detok.output_text == whole
    assert not any("\ufffd" in d for d in deltas)


def test_texts_really_split_characters_across_tokens(tok: Tokenizer) -> None:
    # Otherwise the test above would prove nothing about multi-byte characters.
    assert _splits_a_character(tok, tok.encode(TEXTS[1]))
    assert _splits_a_character(tok, tok.encode(TEXTS[2]))


def test_unfinished_character_is_never_shown(tok: Tokenizer) -> None:
    ids = tok.encode("ok 👩‍👧")
    cut = next(n for n in range(len(ids), 0, -1) if tok.decode(ids[:n]).endswith("\ufffd"))
    detok, deltas = _stream(tok, ids[:cut])
    assert "\ufffd" not in "".join(deltas)
    assert detok.output_text == tok.decode(ids[:cut]).rstrip("\ufffd")


def test_random_ids_match_whole_decode(tok: Tokenizer) -> None:
    # Random ids (as a random-weight model samples) include invalid byte sequences and ids
    # past the vocabulary: the stream must equal the whole decode, minus a broken tail.
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size + 50) for _ in range(rng.randrange(1, 40))]
        detok, deltas = _stream(tok, ids, rng.randrange(1, 4))
        valid = [i for i in ids if i < tok.vocab_size]
        whole = tok.decode(valid, skip_special_tokens=True).rstrip("\ufffd")
        assert "".join(deltas) == detok.output_text == whole


def test_ids_past_the_vocabulary_decode_as_nothing(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok)
    assert detok.update([tok.vocab_size, tok.vocab_size + 1000]) is None
    assert detok.get_delta(finished=True) == ""
    detok.update(tok.encode("hi"))
    assert detok.output_text == "hi"


def test_skip_special_tokens_drops_roles_keeps_think_tags(tok: Tokenizer) -> None:
    assert tok.special.user in tok.special_ids
    assert tok.special.think not in tok.special_ids
    ids = [tok.special.think, *tok.encode("hi"), tok.special.end_think, tok.special.user]
    assert _stream(tok, ids)[0].output_text == "<think>hi</think>"
    assert _stream(tok, ids, skip_special_tokens=False)[0].output_text == (
        "<think>hi</think><|user|>")


def test_window_stays_short(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    # O(new tokens) per update: each decode sees a few tokens, never the whole output.
    sizes: list[int] = []
    decode = tok.decode

    def recording_decode(ids: list[int], **kwargs: Any) -> str:
        sizes.append(len(ids))
        return decode(ids, **kwargs)

    monkeypatch.setattr(tok, "decode", recording_decode)
    ids = tok.encode(" ".join(TEXTS) * 20)
    _, deltas = _stream(tok, ids)
    assert len(ids) > 500 and max(sizes) <= 10
    monkeypatch.undo()
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


# ----------------------------------------------------------------------------- stop strings


def _boundary_stops(tok: Tokenizer, ids: list[int]) -> list[str]:
    """Stop strings of 2 + 2 characters around each token boundary that is also a character
    boundary, so each one's characters come from different tokens."""
    whole = tok.decode(ids, skip_special_tokens=True)
    stops = []
    for k in range(1, len(ids)):
        prefix = tok.decode(ids[:k], skip_special_tokens=True)
        if not prefix.endswith("\ufffd") and 2 <= len(prefix) <= len(whole) - 2:
            stops.append(whole[len(prefix) - 2:len(prefix) + 2])
    return stops


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("text", TEXTS[:3])
def test_stop_strings_split_across_tokens(tok: Tokenizer, text: str, include: bool) -> None:
    ids = tok.encode(text)
    whole = tok.decode(ids, skip_special_tokens=True)
    stops = _boundary_stops(tok, ids)
    assert stops
    for stop in stops:
        detok = IncrementalDetokenizer(tok, stop=[stop], include_stop_str_in_output=include)
        shown = ""
        matched = None
        for i in ids:
            matched = detok.update([i])
            shown += detok.get_delta()
            # Nothing streamed is ever taken back.
            assert detok.output_text.startswith(shown)
            if matched:
                break
        shown += detok.get_delta(finished=True)
        cut = whole.find(stop) + (len(stop) if include else 0)
        assert matched == stop == detok.stop_reason
        assert shown == detok.output_text == whole[:cut]


def test_stop_string_in_one_update_of_many_tokens(tok: Tokenizer) -> None:
    ids = tok.encode("The answer is 42. Done.")
    detok = IncrementalDetokenizer(tok, stop=["is 4"])
    assert detok.update(ids) == "is 4"
    assert detok.get_delta() == "The answer "
    assert detok.update(tok.encode(" more")) is None  # ignored after a stop
    assert detok.output_text == "The answer "


def test_earliest_stop_wins(tok: Tokenizer) -> None:
    ids = tok.encode("one two three")
    detok = IncrementalDetokenizer(tok, stop=["three", "two", "wo t"])
    detok.update(ids)
    assert detok.stop_reason == "two" and detok.output_text == "one "


def test_prefix_of_a_stop_string_is_held_back_then_released(tok: Tokenizer) -> None:
    ids = tok.encode("Hello world, Hello there")
    detok = IncrementalDetokenizer(tok, stop=["Hello there!"])
    shown = ""
    for i in ids:
        assert detok.update([i]) is None
        shown += detok.get_delta()
        held = detok.output_text[len(shown):]
        assert "Hello there!".startswith(held)  # only a stop prefix is ever held
    assert shown == "Hello world, "
    assert detok.get_delta(finished=True) == "Hello there"


def test_held_back_text_is_released_when_it_stops_matching(tok: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tok, stop=["abcd"])
    detok.update(tok.encode("xab"))
    assert detok.get_delta() == "x"
    detok.update(tok.encode("z"))
    assert detok.get_delta() == "abz"


def test_kept_special_tokens_stay_when_the_others_are_skipped(tok: Tokenizer) -> None:
    # The server keeps the grounding markers in the text for its parser and drops the rest.
    sp = tok.special
    if sp.begin_of_box is None or sp.end_of_box is None:
        pytest.skip("this tokenizer has no box markers")
    text = "<|begin_of_box|>[[1, 2, 3, 4]]<|end_of_box|> 你好<|user|>"
    ids = tok.encode(text)
    assert sp.user in ids
    for chunk in (1, 2):
        kept = _stream(tok, ids, chunk, keep_special_token_ids=(sp.begin_of_box, sp.end_of_box))
        assert "".join(kept[1]) == "<|begin_of_box|>[[1, 2, 3, 4]]<|end_of_box|> 你好"
        plain = _stream(tok, ids, chunk)
        assert "".join(plain[1]) == tok.decode(ids, skip_special_tokens=True)
        assert "<|user|>" not in "".join(plain[1])
