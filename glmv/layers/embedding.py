"""Token embedding table (left uninitialised: the loader fills it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmv.checkpoint import LoadedTensor
from glmv.distributed.parallel_state import TPGroup, get_tp_group
from glmv.layers.linear import Bf16Blocks, ColumnParallelLinear, ShapeMismatch, copy_checked


class VocabEmbedding(nn.Module):
    """weight [vocab_size, hidden]; rows past the tokenizer's vocabulary are padding."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def padded_vocab_size(vocab_size: int, tp_size: int, multiple: int = 64) -> int:
    """The vocabulary padded so that every rank holds the same number of rows, a multiple of
    `multiple` (vLLM pads the same way); unpadded on one device."""
    if tp_size == 1:
        return vocab_size
    step = multiple * tp_size
    return -(-vocab_size // step) * step


def load_vocab_rows(param: nn.Parameter, loaded: LoadedTensor, start: int,
                    vocab_size: int) -> None:
    """Rows start.. of a [vocab_size, hidden] checkpoint table into a rank's slice (only they
    are read); the slice's rows past the vocabulary (padding) are zero."""
    if loaded.shape != (vocab_size, param.shape[1]):
        raise ShapeMismatch(tuple(loaded.shape), (vocab_size, param.shape[1]))
    real = max(0, min(param.shape[0], vocab_size - start))
    param.data[real:].zero_()
    if real:  # a last rank may hold padding only
        copy_checked(param.data[:real], loaded.narrow(0, start, real))


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

    def _load_rows(self, param: nn.Parameter, loaded: LoadedTensor, shard_id: object) -> None:
        load_vocab_rows(param, loaded, self.start, self.vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(ColumnParallelLinear):
    """The LM head split by vocabulary rows like the embedding (a tied head shares its slice);
    the logits are gathered on every rank, padding columns dropped. Whole at size 1."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TPGroup | None = None) -> None:
        tp = tp or get_tp_group()
        self.vocab_size = vocab_size
        super().__init__(hidden_size, padded_vocab_size(vocab_size, tp.size), bias=False,
                         gather_output=True, tp=tp)

    def _load_rows(self, param: nn.Parameter, loaded: LoadedTensor, shard_id: object) -> None:
        load_vocab_rows(param, loaded, self.tp.rank * param.shape[0], self.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if logits.shape[-1] == self.vocab_size else logits[..., :self.vocab_size]

    @property
    def chooses_greedy(self) -> bool:
        """Whether `greedy` can pick tokens without the logits: a whole head (one rank) in
        glmv's bf16 blocks."""
        return self.tp.size == 1 and isinstance(self.packed, Bf16Blocks) and not self.packed.swiglu

    def greedy(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, hidden] -> int64 [M]: each row's argmax token, as torch.argmax of forward(x)
        gives it (first of equals, NaN first); straight from the product where
        `chooses_greedy` (an LM head's [M, vocab] logits are megabytes a step to write and
        read back), else from the logits."""
        if self.chooses_greedy:
            assert isinstance(self.packed, Bf16Blocks)
            return self.packed.argmax(x, self.vocab_size)
        return self(x).float().argmax(dim=-1)
