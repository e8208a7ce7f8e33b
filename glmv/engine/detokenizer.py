"""Incremental detokenizer: token ids in, text and stop strings out, one request at a time.

Each update decodes only a short window of tokens: a few already-decoded ones for context plus
the new ones (and any still waiting for the rest of a character), so the cost is O(new tokens).

    ids:     ... | ctx ctx ctx | new new
                 ^ window_start
    decode(ids[window_start:]) = "<emitted before>" + "<new text>" + "<broken tail?>"
                                  '-- window_emitted chars

A byte-level BPE splits a CJK character or an emoji over several tokens; while the window's
text ends in U+FFFD the tail is held back, so no delta ever shows half a character. (We do
not use `tokenizers.decoders.DecodeStream`: it holds back a whole step's text when the step
ends mid-character, and that text is lost when the request ends there.)

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from glmv.tokenizer import Tokenizer

#: Tokens kept before the new ones when the window restarts: decoders that treat the first
#: token specially (e.g. strip its leading space) then decode the new ones as in the full text.
_NUM_CONTEXT_TOKENS = 4
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one completion's token ids into text as they arrive, and finds stop strings.

    Invariants: `output_text` only grows, until a stop string matches; then it is cut (before
    the stop string, or after it with include_stop_str_in_output) and frozen. It never ends in
    a broken UTF-8 character. `get_delta` never returns text that a stop string may still
    remove, unless asked to flush.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False,
                 keep_special_token_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        # Special tokens are dropped by id here (all but the kept ones); decoding then keeps
        # whatever is left, which equals the tokenizer's own skipping when nothing is kept.
        self._drop_ids = (tokenizer.special_ids - frozenset(keep_special_token_ids)
                          if skip_special_tokens else frozenset())
        self._skip_special_tokens = False
        self._vocab_size = tokenizer.vocab_size
        self._stop = tuple(s for s in stop if s)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._ids: list[int] = []  # decodable output ids (ids past the vocabulary dropped)
        self._window_start = 0  # index into _ids where the decoding window begins
        self._window_emitted = 0  # chars of decode(_ids[_window_start:]) already in _text
        self._text = ""  # decoded so far; stop-truncated once stopped
        self._num_sent = 0  # chars of _text returned by get_delta
        self.stop_reason: str | None = None  # the stop string that matched

    @property
    def output_text(self) -> str:
        return self._text

    @property
    def stopped(self) -> bool:
        return self.stop_reason is not None

    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append tokens; the stop string that matched (text cut accordingly), else None.

        Ignored after a stop string matched.
        """
        if self.stop_reason is not None:
            return None
        # The random-weight models can sample ids in the padded part of the vocabulary.
        self._ids.extend(t for t in new_token_ids
                         if 0 <= t < self._vocab_size and t not in self._drop_ids)
        new_text = self._decode_window()
        if not new_text:
            return None
        self._text += new_text
        return self._find_stop(len(self._text) - len(new_text)) if self._stop else None

    def get_delta(self, finished: bool = False) -> str:
        """Text not returned by earlier calls.

        While not finished, hold back the longest suffix that is a proper prefix of a stop
        string, so a stream never shows text a stop string later removes.
        """
        end = len(self._text)
        if not finished and self.stop_reason is None and self._stop:
            end -= self._num_held_back()
        if end <= self._num_sent:
            return ""
        delta = self._text[self._num_sent:end]
        self._num_sent = end
        return delta

    def _decode_window(self) -> str:
        """Decode the window; return the text past what it already gave, up to a broken tail."""
        window = self._ids[self._window_start:]
        text = self._tokenizer.decode(window, skip_special_tokens=self._skip_special_tokens)
        # A trailing U+FFFD may be a character whose remaining bytes are still to come.
        stable = len(text.rstrip(_REPLACEMENT))
        new_text = text[self._window_emitted:stable]
        self._window_emitted = max(self._window_emitted, stable)
        if stable == len(text) and len(window) > _NUM_CONTEXT_TOKENS:
            # Every byte so far is decoded: restart the window to keep it short.
            self._window_start = len(self._ids) - _NUM_CONTEXT_TOKENS
            context = self._ids[self._window_start:]
            self._window_emitted = len(self._tokenizer.decode(
                context, skip_special_tokens=self._skip_special_tokens))
        return new_text

    def _find_stop(self, new_start: int) -> str | None:
        """Look for stop strings ending in the text from `new_start` on; the earliest-ending
        match wins (an earlier start breaks ties), as if the text arrived a char at a time."""
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop in self._stop:
            start = self._text.find(stop, max(0, new_start - len(stop) + 1))
            if start != -1:
                match = (start + len(stop), start, stop)
                best = match if best is None or match[:2] < best[:2] else best
        if best is None:
            return None
        end, start, stop = best
        self._text = self._text[:end] if self._include_stop else self._text[:start]
        self._num_sent = min(self._num_sent, len(self._text))
        self.stop_reason = stop
        return stop

    def _num_held_back(self) -> int:
        """Length of the longest unsent suffix that a stop string starts with (and is longer
        than)."""
        text = self._text
        longest = min(len(text) - self._num_sent, self._max_stop_len - 1)
        for size in range(longest, 0, -1):
            suffix = text[len(text) - size:]
            if any(len(s) > size and s.startswith(suffix) for s in self._stop):
                return size
        return 0
