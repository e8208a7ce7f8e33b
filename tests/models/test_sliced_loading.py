"""Each tensor-parallel rank reads only its own slice of the checkpoint.

A model is built as rank r of a group of two (the module-level group is swapped in for the
construction only: loading needs no collective, so no processes are started) and loaded from a
tiny checkpoint through a reader that counts the bytes it reads. Its parameters must equal the
matching slices of the whole model (FP8 too: a region dequantizes to the bits of the whole), and
the bytes read must be its share: half of each split decoder tensor, all of each replicated one,
and, with expert parallel, nothing of another rank's experts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from glmv.checkpoint import CheckpointReader
from glmv.config import ModelConfig
from glmv.distributed import parallel_state
from glmv.distributed.parallel_state import TPGroup
from glmv.layers.embedding import ParallelLMHead, VocabParallelEmbedding, padded_vocab_size
from glmv.layers.linear import ColumnParallelLinear, MergedLinear, RowParallelLinear
from glmv.layers.moe import FusedExperts
from glmv.models import loader
from glmv.models.loader import iter_weights, load_model, load_weights
from glmv.models.registry import model_class

SCALE = ".weight_scale_inv"
DECODER = re.compile(r"^(model\.language_model\.|lm_head\.)")
# Decoder tensors split over the ranks; every other decoder tensor is replicated.
SPLIT = re.compile(r"(self_attn\.[qkvo]_proj|_proj\.weight|embed_tokens|lm_head)")
EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")
VOCAB = re.compile(r"(embed_tokens|lm_head)\.weight$")
CASES = [("glm-4.6v-flash", False, False), ("glm-4.6v-flash", True, False),
         ("glm-4.5v", False, False), ("glm-4.5v", True, False),
         ("glm-4.5v", False, True), ("glm-4.5v", True, True)]


def load_as(folder: Path, tp: TPGroup, monkeypatch: pytest.MonkeyPatch
            ) -> tuple[nn.Module, CheckpointReader]:
    """The model of `folder` built as `tp`'s rank (float32), loaded through a counting reader."""
    cfg = ModelConfig.from_pretrained(folder)
    with monkeypatch.context() as patch:
        patch.setattr(parallel_state, "_TP", tp)
        model = model_class(cfg)(cfg)
    reader = CheckpointReader(folder)
    load_weights(model, iter_weights(reader, cfg.quantization, progress=False))
    return model, reader


def _part(full: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    size = full.shape[dim] // parts
    return full.narrow(dim, index * size, size)


def expected_slice(module: nn.Module, whole: nn.Module, name: str, full: torch.Tensor,
                   tp: TPGroup) -> torch.Tensor:
    """What rank tp.rank holds of parameter `name` of `module`, cut from the whole `full`."""
    rank, size = tp.rank, tp.size
    if isinstance(module, FusedExperts):
        if tp.expert_parallel:
            return _part(full, 0, rank, size)  # whole experts
        if name == "w2":
            return _part(full, 2, rank, size)
        return torch.cat([_part(half, 1, rank, size) for half in full.chunk(2, dim=1)], dim=1)
    if isinstance(module, (VocabParallelEmbedding, ParallelLMHead)):
        rows = module.weight.shape[0]
        return _part(F.pad(full, (0, 0, 0, rows * size - full.shape[0])), 0, rank, size)
    if isinstance(module, RowParallelLinear):
        return _part(full, 1, rank, size) if name == "weight" else full
    if isinstance(module, ColumnParallelLinear):
        return _part(full, 0, rank, size)
    if isinstance(module, MergedLinear):
        # Each projection cut in `parts` (the group size; fewer for replicated KV heads).
        assert isinstance(whole, MergedLinear)
        pieces = full.split([s for _, s in whole.shard_offsets.values()])
        kept = []
        for piece, (_, local) in zip(pieces, module.shard_offsets.values(), strict=True):
            parts = piece.shape[0] // local
            kept.append(_part(piece, 0, rank * parts // size, parts))
        return torch.cat(kept)
    return full


def assert_slices_of_whole(model: nn.Module, whole: nn.Module, tp: TPGroup) -> None:
    whole_params = dict(whole.named_parameters())
    checked = 0
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            full_name = f"{prefix}.{name}" if prefix else name
            want = expected_slice(module, whole.get_submodule(prefix), name,
                                  whole_params[full_name], tp)
            assert param.shape == want.shape, full_name
            assert torch.equal(param, want), full_name
            checked += 1
    assert checked == len(whole_params)


def assert_share_read(reader: CheckpointReader, tp: TPGroup) -> None:
    """Decoder tensors: split ones read half (the vocabulary: this rank's rows), replicated
    ones whole and once, other ranks' experts not at all."""
    vocab = reader.shapes["model.language_model.embed_tokens.weight"][0]
    rows = padded_vocab_size(vocab, tp.size) // tp.size  # per rank, the last one's part padding
    experts = len({m[1] for m in map(EXPERT.search, reader.nbytes) if m})  # 0: dense
    for name, nbytes in reader.nbytes.items():
        read = reader.bytes_read[name]
        expert = EXPERT.search(name)
        if name.endswith(SCALE):  # the scales of the blocks touched (edges read twice)
            assert 0 < read <= nbytes or (read == 0 and expert and tp.expert_parallel), name
        elif not DECODER.match(name):
            assert read in (nbytes, nbytes // tp.size), name  # the vision tower
        elif expert and tp.expert_parallel:
            mine = int(expert[1]) // (experts // tp.size) == tp.rank
            assert read == (nbytes if mine else 0), name
        elif VOCAB.search(name):
            assert read == nbytes * min(rows, vocab - rows * tp.rank) // vocab, name
        elif SPLIT.search(name):
            assert read == nbytes // tp.size, name
        else:
            assert read == nbytes, name


@pytest.mark.parametrize("variant, fp8, expert_parallel", CASES)
def test_each_rank_reads_and_keeps_its_slice(variant: str, fp8: bool, expert_parallel: bool,
                                             tiny_checkpoint: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_checkpoint(variant, fp8=fp8) if fp8 else tiny_checkpoint(variant)
    whole = load_model(folder, dtype="float32", progress=False)
    one = load_as(folder, TPGroup(), monkeypatch)[1]
    assert one.bytes_read == one.nbytes  # one device: every tensor read once, whole
    split_bytes = sum(n for name, n in one.nbytes.items()
                      if DECODER.match(name) and SPLIT.search(name) and not name.endswith(SCALE))
    for rank in range(2):
        tp = TPGroup(rank=rank, size=2, expert_parallel=expert_parallel)
        model, reader = load_as(folder, tp, monkeypatch)
        assert_slices_of_whole(model, whole, tp)
        assert_share_read(reader, tp)
        split_read = sum(n for name, n in reader.bytes_read.items()
                         if DECODER.match(name) and SPLIT.search(name)
                         and not name.endswith(SCALE))
        assert 0.45 < split_read / split_bytes < 0.55
        assert sum(reader.bytes_read.values()) < 0.7 * sum(one.bytes_read.values())


class RecordingBar:
    """Stands in for tqdm: records every update."""

    made: ClassVar[list[RecordingBar]] = []

    def __init__(self, total: int, **kwargs: Any) -> None:
        self.total = total
        self.updates: list[int] = []
        RecordingBar.made.append(self)

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        pass


def test_progress_counts_the_whole_checkpoint_per_tensor(tiny_checkpoint: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar moves tensor by tensor through every file, read or skipped, to its total."""
    folder = tiny_checkpoint("glm-4.5v", fp8=True, max_shard_bytes=300_000)
    monkeypatch.setattr(loader, "tqdm", RecordingBar)
    RecordingBar.made.clear()
    _, reader = load_as(folder, TPGroup(rank=1, size=2, expert_parallel=True), monkeypatch)
    (bar,) = RecordingBar.made
    assert len(reader.files) > 2 and bar.total == reader.total_bytes
    assert sum(bar.updates) == bar.total
    assert len(bar.updates) == len(reader.nbytes) + len(reader.files)
