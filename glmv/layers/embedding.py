"""Token embedding table (left uninitialised: the loader fills it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmv.distributed.parallel_state import TPGroup, get_tp_group
from glmv.layers.linear import ShapeMismatch


class VocabEmbedding(nn.Module):
    """weight [vocab_size, hidden]; rows past the tokenizer's vocabulary are padding."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 64) -> int:
    """The vocabulary padded so that every rank holds the same number of rows, a multiple of
    `multiple` (vLLM pads the same way)."""
    step = multiple * tp_size
    return -(-vocab_size // step) * step


class VocabParallelEmbedding(VocabEmbedding):
    """The embedding table split by rows (token ids) over the tensor-parallel group.

    The vocabulary is padded (`padded_vocab_size`) so the ranks hold equal slices; padding rows
    are zero. Each rank looks up the ids in its slice (zero for the others), and one all-reduce
    gives every rank the full embeddings.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 tp: TPGroup | None = None) -> None:
        self.tp = tp or get_tp_group()
        self.vocab_size = num_embeddings
        self.padded_size = padded_vocab_size(num_embeddings, self.tp.size)
        self.rows = self.padded_size // self.tp.size
        self.start = self.tp.rank * self.rows
        super().__init__(self.rows, embedding_dim)
        self.weight.weight_loader = self._load_rows  # type: ignore[attr-defined]

    def _load_rows(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object) -> None:
        if loaded.shape != (self.vocab_size, param.shape[1]):
            raise ShapeMismatch(tuple(loaded.shape), (self.vocab_size, param.shape[1]))
        real = max(0, min(self.rows, self.vocab_size - self.start))
        param.data[real:].zero_()
        param.data[:real].copy_(loaded[self.start:self.start + real])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """The LM head split by vocabulary rows like the embedding (so a tied head shares its
    slice); `logits` gathers the ranks' slices and drops the padding columns."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = F.linear(hidden, self.weight)
        return self.tp.all_gather(local)[..., :self.vocab_size]
