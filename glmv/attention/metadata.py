"""What an attention backend needs to know about one forward over flattened tokens.

The tokens of all sequences in a step are concatenated. Sequence i owns new tokens
[query_start_loc[i], query_start_loc[i+1]) and, once they are written, has seq_lens[i] tokens of
context in the KV cache; its first new token sits at position seq_lens[i] - query_len_i.

    tokens:  | seq 0 new tokens | seq 1 new tokens | ...
    cache:   seq i's keys live in blocks block_tables[i, 0..], slot = block * block_size + offset
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    """Per-forward attention layout, shared by every layer of the decoder."""

    query_start_loc: list[int]  # [num_seqs + 1] cumulative new-token counts (host)
    seq_lens: list[int]  # [num_seqs] context length after this step: cached + new (host)
    slot_mapping: torch.Tensor | None = None  # [num_tokens] int64 KV slot per new token
    block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] int32 block ids
    block_size: int = 0  # tokens per KV block (0 when there is no cache)
    # Causal masks built for this step, reused by every layer: (seq index) -> mask.
    _masks: dict[int, torch.Tensor | None] = field(default_factory=dict, init=False,
                                                   repr=False, compare=False)
    _decode: DecodeBatch | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.query_start_loc) != len(self.seq_lens) + 1:
            raise ValueError("query_start_loc must have one more entry than seq_lens")
        for i, seq_len in enumerate(self.seq_lens):
            if self.query_len(i) > seq_len:
                raise ValueError(f"sequence {i} has more new tokens than context")
        if (self.slot_mapping is None) != (self.block_tables is None):
            raise ValueError("slot_mapping and block_tables come together")
        if self.slot_mapping is None and any(
                self.query_len(i) != n for i, n in enumerate(self.seq_lens)):
            raise ValueError("without a KV cache each sequence's new tokens are its whole context")

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    @property
    def uses_cache(self) -> bool:
        return self.slot_mapping is not None

    def query_len(self, i: int) -> int:
        return self.query_start_loc[i + 1] - self.query_start_loc[i]

    def causal_mask(self, i: int, device: torch.device) -> torch.Tensor | None:
        """Bool [query_len, seq_len] for sequence i: new token j (position seq_len - query_len
        + j) sees keys at positions <= its own. None when one query token sees everything."""
        if i not in self._masks:
            query_len, seq_len = self.query_len(i), self.seq_lens[i]
            mask = None
            if query_len > 1:
                rows = torch.arange(query_len, device=device)[:, None] + (seq_len - query_len)
                mask = torch.arange(seq_len, device=device)[None, :] <= rows
            self._masks[i] = mask
        return self._masks[i]

    def decode_batch(self) -> DecodeBatch | None:
        """The sequences with one new token and cached context, laid out for one batched
        attention call (built once per step, reused by every layer); None when there are none."""
        if self._decode is None and self.block_tables is not None:
            seqs = [i for i in range(self.num_seqs)
                    if self.query_len(i) == 1 and self.seq_lens[i] > 1]
            if seqs:
                self._decode = DecodeBatch.build(self, seqs)
        return self._decode

    def last_token_rows(self, seqs: list[int]) -> list[int]:
        """The row of each of `seqs`' last new token among the step's tokens."""
        return [self.query_start_loc[i + 1] - 1 for i in seqs]

    def last_tokens(self, seqs: list[int]) -> DecodeBatch:
        """The last new token of each of `seqs` as one query over its sequence's whole context
        in the cache (written first), laid out like a decode batch whose token_idx are the
        rows 0.. of those queries taken out of the step's tokens (the decoder's last layer
        needs no other: `Glm4vTextModel.forward`'s `last_of`)."""
        if self.block_tables is None:
            raise ValueError("last_tokens attends through the KV cache: this step has none")
        return DecodeBatch.build(self, seqs, list(range(len(seqs))))

    @classmethod
    def without_cache(cls, query_lens: list[int]) -> AttentionMetadata:
        """Each sequence's new tokens are its whole context (no KV cache): a plain prefill."""
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        return cls(query_start_loc=starts, seq_lens=list(query_lens))


@dataclass
class DecodeBatch:
    """Decode sequences of one step, attended together over their gathered blocks.

        flat_blocks [S * num_blocks]: block ids covering the longest context, row by row
                                      (padding: block 0)
        padding     [S, 1, 1, num_blocks * block_size]: True for key positions >= seq_len
        seq_idx, seq_lens [S] int64: row of block_tables and context length of each (for
                                     kernels that read the block tables themselves)
    """

    seqs: list[int]  # sequence indices in the step
    token_idx: torch.Tensor  # [S] index of each sequence's new token among the step's tokens
    flat_blocks: torch.Tensor  # [S * num_blocks] int64
    padding: torch.Tensor  # [S, 1, 1, T] bool
    seq_idx: torch.Tensor  # [S] int64
    seq_lens: torch.Tensor  # [S] int64

    @classmethod
    def build(cls, meta: AttentionMetadata, seqs: list[int],
              token_idx: list[int] | None = None) -> DecodeBatch:
        """`seqs`' queries at `token_idx` (default: each one's first new token in the step)."""
        assert meta.block_tables is not None
        device = meta.block_tables.device
        lens = torch.tensor([meta.seq_lens[i] for i in seqs], device=device)
        num_blocks = -(-int(lens.max()) // meta.block_size)
        index = torch.tensor(seqs, device=device)
        tables = meta.block_tables[index, :num_blocks].long()
        keys = torch.arange(num_blocks * meta.block_size, device=device)
        padding = (keys[None, :] >= lens[:, None])[:, None, None, :]
        if token_idx is None:
            token_idx = [meta.query_start_loc[i] for i in seqs]
        return cls(seqs, torch.tensor(token_idx, dtype=torch.long, device=device),
                   tables.reshape(-1), padding, index, lens)
