"""A checkpoint's tokenizer: tokenizer.json through `tokenizers`, special tokens from the files.

Special-token ids are looked up by content in the checkpoint (never hard-coded): GLM-4.1V and the
GLM-4.5-tokenizer models put `<|image|>`, `<think>` and the box tokens at different ids, and
test checkpoints use other ids again.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from glmv import chat_template
from glmv.config import read_json_object
from glmv.errors import ChatTemplateError, TokenizerError

# Tokens every GLM-V tokenizer has; a checkpoint without them is not a GLM-V checkpoint.
REQUIRED_TOKENS = (
    "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>", "<|endoftext|>", "<think>", "</think>",
)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens glmv's own logic refers to, read from the checkpoint by content."""

    image: int  # <|image|>
    video: int  # <|video|>
    begin_of_image: int
    end_of_image: int
    begin_of_video: int
    end_of_video: int
    think: int  # <think>
    end_think: int  # </think>
    user: int  # <|user|>
    assistant: int  # <|assistant|>
    observation: int  # <|observation|>
    endoftext: int
    newline: int  # "\n" as one token
    begin_of_box: int | None  # <|begin_of_box|>
    end_of_box: int | None
    tool_call: int | None  # <tool_call> (GLM-4.5 tokenizer only)
    end_tool_call: int | None
    answer: int | None  # <answer> (GLM-4.1V only)
    end_answer: int | None


class Tokenizer:
    """tokenizer.json + tokenizer_config.json + chat template of one checkpoint folder."""

    def __init__(self, tokenizer: HFTokenizer, config: Mapping[str, Any],
                 chat_template_source: str | None, source: str = "") -> None:
        self._tok = tokenizer
        self.config = dict(config)
        self.chat_template = chat_template_source
        self.source = source
        missing = [t for t in REQUIRED_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"tokenizer {source} lacks the GLM-V tokens {missing}")
        self.special_ids = frozenset(
            tid for tid, tok in tokenizer.get_added_tokens_decoder().items() if tok.special
        )
        self.special = self._special_tokens()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> Tokenizer:
        root = Path(model_dir)
        tok_path = root / "tokenizer.json"
        if not tok_path.is_file():
            raise TokenizerError(f"{tok_path} not found")
        try:
            tok = HFTokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise TokenizerError(f"{tok_path} cannot be loaded: {exc}") from exc
        config = _read_json(root / "tokenizer_config.json")
        template = _read_template(root, config)
        return cls(tok, config, template, str(root))

    def _special_tokens(self) -> SpecialTokens:
        def tid(t: str) -> int:
            value = self._tok.token_to_id(t)
            assert value is not None
            return value

        newline = self._tok.encode("\n", add_special_tokens=False).ids
        if len(newline) != 1:
            raise TokenizerError(f"tokenizer {self.source} does not encode a newline as one token")
        opt = self._tok.token_to_id
        return SpecialTokens(
            image=tid("<|image|>"), video=tid("<|video|>"),
            begin_of_image=tid("<|begin_of_image|>"), end_of_image=tid("<|end_of_image|>"),
            begin_of_video=tid("<|begin_of_video|>"), end_of_video=tid("<|end_of_video|>"),
            think=tid("<think>"), end_think=tid("</think>"), user=tid("<|user|>"),
            assistant=tid("<|assistant|>"), observation=tid("<|observation|>"),
            endoftext=tid("<|endoftext|>"), newline=newline[0],
            begin_of_box=opt("<|begin_of_box|>"), end_of_box=opt("<|end_of_box|>"),
            tool_call=opt("<tool_call>"), end_tool_call=opt("</tool_call>"),
            answer=opt("<answer>"), end_answer=opt("</answer>"),
        )

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def eos_token_id(self) -> int:
        eos = self.config.get("eos_token", "<|endoftext|>")
        if isinstance(eos, Mapping):
            eos = eos.get("content")
        value = self._tok.token_to_id(str(eos))
        return value if value is not None else self.special.endoftext

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry: no token covers more of a text."""
        return max((len(token) for token in self._tok.get_vocab(with_added_tokens=True)),
                   default=1)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their single ids."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template_source: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, with one placeholder per image/video."""
        source = chat_template_source or self.chat_template
        if source is None:
            raise ChatTemplateError(
                f"checkpoint {self.source} has no chat template; pass one with --chat-template"
            )
        return chat_template.render(source, messages, tools=tools,
                                    add_generation_prompt=add_generation_prompt,
                                    **template_kwargs)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, TokenizerError, "tokenizer file") if path.is_file() else {}


def _read_template(root: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja wins over the older `chat_template` key of tokenizer_config.json."""
    path = root / "chat_template.jinja"
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"cannot read chat template {path}: {exc}") from exc
    legacy = root / "chat_template.json"
    if legacy.is_file():
        value = _read_json(legacy).get("chat_template")
        if isinstance(value, str):
            return value
    value = config.get("chat_template")
    return value if isinstance(value, str) else None
