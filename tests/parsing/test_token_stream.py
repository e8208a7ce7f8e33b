"""Every table row streamed the way the server streams it: tokenized with a GLM-V tokenizer and
detokenized one token at a time by the engine's incremental detokenizer (special tokens skipped
except the box markers the server keeps), so each delta ends at a token boundary — inside
multi-byte characters and tags as the tokenizer splits them. The deltas must add up to the
parse of the whole text."""

from __future__ import annotations

from typing import Any

import pytest

from glmv.engine.detokenizer import IncrementalDetokenizer
from glmv.parsing import ParserConfig
from glmv.tokenizer import Tokenizer
from tests.parsing.cases import Case
from tests.parsing.streaming import check_stream
from tests.parsing.test_streaming import ARGS, ROW_PARAMS


@pytest.fixture(scope="module")
def tok(tiny_checkpoint: Any) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_checkpoint("glm-4.6v"))


def token_deltas(tok: Tokenizer, text: str) -> tuple[str, list[str]]:
    """(the text the detokenizer produces, its per-token deltas)."""
    sp = tok.special
    keep = tuple(t for t in (sp.begin_of_box, sp.end_of_box) if t is not None)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True, keep_special_token_ids=keep)
    deltas = []
    for token in tok.encode(text):
        detok.update([token])
        deltas.append(detok.get_delta())
    deltas.append(detok.get_delta(finished=True))
    return detok.output_text, deltas


@pytest.mark.parametrize(ARGS, ROW_PARAMS)
def test_token_by_token(tok: Tokenizer, text: str, config: ParserConfig,
                        kwargs: dict[str, Any], case: Case | None) -> None:
    decoded, deltas = token_deltas(tok, text)
    # The tags the parser reads survive detokenization (the box markers because they are
    # kept), so the text is the original and the table's expectations apply unchanged.
    assert decoded == text
    result = check_stream(text, deltas, config, **kwargs)
    if case is not None:
        case.check(result)

