"""The vision tower keeps each grid's position embeddings and rotary tables between calls:
the same embeddings as a tower that makes them anew, and new tables once the position table
changes."""

from __future__ import annotations

import torch

from glmv.models.loader import load_model
from tests.conftest import TinyCheckpointFactory


def test_grid_tables_are_kept_and_remade_after_new_weights(
        tiny_checkpoint: TinyCheckpointFactory) -> None:
    model = load_model(tiny_checkpoint("glm-4.1v-thinking"), dtype="float32", progress=False)
    vision = model.visual
    cfg = vision.cfg
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    grids = [(1, 4, 6), (1, 6, 4), (1, 4, 6)]  # two grids, one of them twice
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), patch_dim,
                         generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        first = vision(pixels, grids)
        assert len(vision._grids) == 2
        kept = {key[:2]: tables for key, tables in vision._grids.items()}
        again = vision(pixels, grids)
        assert torch.equal(first, again)
        assert all(tables is kept[key[:2]] for key, tables in vision._grids.items())
        vision._grids.clear()
        assert torch.equal(vision(pixels, grids), first)  # made anew: the same embeddings

    table = vision.embeddings.position_embedding.weight
    with torch.no_grad():
        table.mul_(2.0)  # new weights in place
    with torch.inference_mode():
        changed = vision(pixels, grids)
    assert not torch.equal(changed, first)
    vision._grids.clear()
    with torch.inference_mode():
        assert torch.equal(vision(pixels, grids), changed)


def test_fused_residual_norms_give_the_blocks_bits(tiny_checkpoint: TinyCheckpointFactory) -> None:
    """The tower runs its blocks as `forward_normed` (each residual add with the norm after it,
    one kernel pass on CPU): the same bf16 bits as `forward` followed by the next norm."""
    model = load_model(tiny_checkpoint("glm-4.1v-thinking"), dtype="bfloat16", progress=False)
    vision = model.visual
    hidden = vision.cfg.hidden_size
    x = torch.randn(48, hidden, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    _, cos, sin = vision._positions([(4, 6), (6, 4)], x.device)
    with torch.inference_mode():
        for i, block in enumerate(vision.blocks):
            last = i + 1 == len(vision.blocks)
            next_norm = vision.post_layernorm if last else vision.blocks[i + 1].norm1
            out, normed = block.forward_normed(x, block.norm1(x), cos, sin, [24, 24], next_norm)
            expected = block(x, cos, sin, [24, 24])
            assert torch.equal(out, expected)
            assert torch.equal(normed, next_norm(expected))
            x = out
