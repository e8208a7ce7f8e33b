"""Train a byte-level BPE tokenizer locally and give it the family's special tokens.

The pre-tokenizer is the GLM-4 one (a GPT-4 style split regex followed by byte-level mapping),
the added tokens follow the published order and special flags of the variant, and
tokenizer_config.json carries `added_tokens_decoder` like the published files, so both glmv and
transformers load the result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from glmv.tiny.corpus import corpus
from glmv.tiny.variants import VariantSpec

GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Learned vocabulary size (before added tokens) and corpus length per checkpoint size.
_BPE_SIZES = {"tiny": (1536, 4000), "bench": (8192, 30000)}


def train_tokenizer(spec: VariantSpec, size: str, seed: int) -> Tokenizer:
    """A deterministic tokenizer: same variant, size and seed give the same tokenizer.json."""
    vocab_size, num_lines = _BPE_SIZES[size]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed, num_lines), trainer)
    # One at a time, so ids follow the published order whatever the special flags.
    for content, special in spec.added_tokens:
        token = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                           single_word=False)
        if special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    return tok


def token_ids(tok: Tokenizer, spec: VariantSpec) -> dict[str, int]:
    ids = {}
    for content, _ in spec.added_tokens:
        token_id = tok.token_to_id(content)
        assert token_id is not None, content
        ids[content] = token_id
    return ids


def tokenizer_config(tok: Tokenizer, spec: VariantSpec, max_len: int) -> dict[str, Any]:
    """tokenizer_config.json in the published shape (chat template lives in its own file)."""
    decoder = {}
    specials = []
    for content, special in spec.added_tokens:
        decoder[str(tok.token_to_id(content))] = {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
        if special:
            specials.append(content)
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": specials,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": max_len,
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def write_tokenizer(out: Path, tok: Tokenizer, spec: VariantSpec, max_len: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tok, spec, max_len), indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
