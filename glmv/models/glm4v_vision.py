"""The GLM-V vision tower (shared by glm4v and glm4v_moe), read top to bottom.

pixel rows [P, 3*2*14*14] (block-major patch order, see multimodal/image.py)
  -> patch_embed (Conv3d with kernel = stride, i.e. one matmul per patch)   [P, hidden]
  -> post_conv_layernorm, + learned position table resampled to each grid  [P, hidden]
  -> depth x block(2-D rotary attention within one image / one frame pair) [P, hidden]
  -> post_layernorm, 2x2 merge through `downsample` (Conv2d k = s = 2)    [P / 4, out_hidden]
  -> merger (proj, LayerNorm, GELU, SwiGLU)                                [P / 4, out_hidden]
The P / 4 outputs fill the <|image|> placeholders in order.

Over a tensor-parallel group the tower runs in one of two modes (TPGroup.encoder_data_parallel):
"weights" splits it like the decoder (attention heads, the SwiGLUs of the blocks and the merger;
the rest is small and stays replicated); "data" keeps it whole on every rank, shares the items
(images, videos) out over the ranks and gathers their embeddings.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from glmv.attention.segments import segment_attention
from glmv.config import VisionConfig
from glmv.distributed.parallel_state import TPGroup, get_tp_group
from glmv.layers.embedding import VocabEmbedding
from glmv.layers.linear import (
    KernelEqualsStride,
    Linear,
    PackedQKVParallelLinear,
    RowParallelLinear,
)
from glmv.layers.mlp import GatedMLP
from glmv.layers.norm import RMSNorm, add_rms_norm
from glmv.layers.rotary import VisionRotaryEmbedding

Grid = tuple[int, int, int]
GridTables = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # position embeddings, cos, sin


def block_major_hw(grid_h: int, grid_w: int, merge: int, device: torch.device) -> torch.Tensor:
    """(row, col) of every patch in the processor's order: 2x2 merge blocks, row-major inside.

        rows of blocks -> blocks in a row -> (0,0) (0,1) (1,0) (1,1) inside a block
    Returns [grid_h * grid_w, 2].
    """
    rows = torch.arange(grid_h, device=device)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w, device=device)[None, :].expand(grid_h, grid_w)
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    rows = rows.reshape(shape).transpose(1, 2).flatten()
    cols = cols.reshape(shape).transpose(1, 2).flatten()
    return torch.stack((rows, cols), dim=-1)


def share_items(sizes: Sequence[int], parts: int) -> list[int]:
    """The rank that encodes each item (data mode), balancing patch counts: largest item first,
    each to the least-loaded rank (the lowest on ties). Deterministic, so every rank computes the
    same assignment without communicating."""
    loads = [0] * parts
    owners = [0] * len(sizes)
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        rank = min(range(parts), key=loads.__getitem__)
        owners[item] = rank
        loads[rank] += sizes[item]
    return owners


class VisionPatchEmbed(nn.Module):
    """Conv3d(3 -> hidden, kernel = stride = (2, 14, 14)) on flattened patch rows."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = KernelEqualsStride(cfg.hidden_size, (cfg.in_channels, *kernel))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels)


class VisionEmbeddings(nn.Module):
    """Learned (image_size/patch)^2 position table, bicubically resampled to any grid."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        num_positions = (cfg.image_size // cfg.patch_size) ** 2
        self.position_embedding = VocabEmbedding(num_positions, cfg.hidden_size)

    def for_grid(self, hw: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """hw: [n, 2] patch (row, col) -> [n, hidden], sampled in fp32 at patch centres."""
        table = self.position_embedding.weight
        side = int(table.shape[0] ** 0.5)
        image = table.view(side, side, -1).permute(2, 0, 1)[None].float()  # [1, C, side, side]
        norm_w = (hw[:, 1].float() + 0.5) / grid_w * 2 - 1
        norm_h = (hw[:, 0].float() + 0.5) / grid_h * 2 - 1
        grid = torch.stack((norm_w, norm_h), dim=-1)[None, :, None, :]  # [1, n, 1, 2]
        sampled = F.grid_sample(image, grid, mode="bicubic", align_corners=False,
                                padding_mode="border")  # [1, C, n, 1]
        return sampled[0, :, :, 0].transpose(0, 1).to(table.dtype)


class VisionAttention(nn.Module):
    """Bidirectional attention restricted to each segment (an image or a video frame pair),
    its heads split over `tp` (qkv column-parallel by heads, proj row-parallel)."""

    def __init__(self, cfg: VisionConfig, tp: TPGroup) -> None:
        super().__init__()
        # Checked here first so that the error names the vision tower, not the decoder.
        self.num_heads = tp.shard(cfg.num_heads, "vision attention heads")
        self.head_dim = cfg.head_dim
        self.qkv = PackedQKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                           cfg.num_heads, bias=cfg.attention_bias, tp=tp)
        self.proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, tp=tp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                seg_lens: Sequence[int]) -> torch.Tensor:
        n, heads = x.shape[0], self.num_heads
        qkv = self.qkv(x).view(n, 3 * heads, self.head_dim)
        VisionRotaryEmbedding.rotate_(qkv[:, :2 * heads], cos, sin)  # q and k heads
        q, k, v = qkv.view(n, 3, heads, self.head_dim).unbind(1)
        return self.proj(segment_attention(q, k, v, seg_lens).view(n, -1))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: 2-D rotary attention, then a SwiGLU of width out_hidden_size
    (not intermediate_size, which belongs to the merger)."""

    def __init__(self, cfg: VisionConfig, tp: TPGroup) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg, tp)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.out_hidden_size, tp=tp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                seg_lens: Sequence[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seg_lens)
        return x + self.mlp(self.norm2(x))

    def forward_normed(self, x: torch.Tensor, normed: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, seg_lens: Sequence[int],
                       next_norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward` on x and its norm1(x) (`normed`), returning (out, next_norm(out)): each
        residual add runs with the norm after it in one pass over the rows (the same bits)."""
        h, normed = add_rms_norm(self.attn(normed, cos, sin, seg_lens), x, None, self.norm2)
        return add_rms_norm(self.mlp(normed), h, None, next_norm)


class VisionPatchMerger(GatedMLP):
    """proj -> LayerNorm -> GELU, then the SwiGLU (its gate_up_proj / down_proj, split over
    `tp`; proj and the norm stay whole, as in vLLM, being small)."""

    def __init__(self, dim: int, width: int, tp: TPGroup) -> None:
        super().__init__(dim, width, tp=tp)
        self.proj = Linear(dim, dim)
        self.post_projection_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


class Glm4vVisionModel(nn.Module):
    """Encodes images and video frame pairs into LLM-width embeddings.

    `tp` (default: the tensor-parallel group) in data mode builds every layer whole (over a
    group of one) and is then used only to share the items out and gather their embeddings.
    """

    #: Every call multiplies all patches of a step's images and frames (hundreds to thousands
    #: of rows), never a decode-sized batch: its linear layers take the layout fastest for many
    #: rows (glmv.layers.linear.pack_linear_weights).
    many_rows = True
    #: Grids whose position embeddings and rotary tables are kept (`_grid_tables`).
    GRID_CACHE_SIZE = 64

    def __init__(self, cfg: VisionConfig, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.tp = tp or get_tp_group()
        layers_tp = TPGroup() if self.tp.encoder_data_parallel else self.tp
        self.patch_embed = VisionPatchEmbed(cfg)
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.embeddings = VisionEmbeddings(cfg)
        self.rotary_pos_emb = VisionRotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList([VisionBlock(cfg, layers_tp) for _ in range(cfg.depth)])
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        m = cfg.spatial_merge_size
        self.downsample = KernelEqualsStride(cfg.out_hidden_size, (cfg.hidden_size, m, m))
        self.merger = VisionPatchMerger(cfg.out_hidden_size, cfg.intermediate_size,
                                        layers_tp)
        self._grids: OrderedDict[tuple[object, ...], GridTables] = OrderedDict()

    def forward(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """pixels: [P, patch_dim] for all items; grids: (t, h, w) per item -> [P / merge^2, D].

        A grid with t > 1 (a video) attends within each temporal slice, like t grids of 1.
        In data mode every rank of the group must call this with the same arguments.
        """
        patches = sum(t * h * w for t, h, w in grids)
        if patches != pixels.shape[0]:
            raise ValueError(f"grids cover {patches} patches, pixel rows are {pixels.shape[0]}")
        if self.tp.encoder_data_parallel and self.tp.size > 1:
            return self._encode_shared(pixels, grids)
        return self._encode(pixels, grids)

    def _encode_shared(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """Data mode: this rank encodes its share of the items; the shares are gathered on every
        rank (rank order) and put back in item order."""
        sizes = [t * h * w for t, h, w in grids]
        owners = share_items(sizes, self.tp.size)
        shares = [[i for i, owner in enumerate(owners) if owner == rank]
                  for rank in range(self.tp.size)]
        rows = [size // self.cfg.spatial_merge_size**2 for size in sizes]
        local = self._encode_items(pixels.split(sizes), grids, shares[self.tp.rank])
        gathered = self.tp.all_gather_rows(local, [sum(rows[i] for i in share) for share in shares])
        order = [i for share in shares for i in share]
        embeds = dict(zip(order, gathered.split([rows[i] for i in order]), strict=True))
        return torch.cat([embeds[i] for i in range(len(grids))])

    def _encode_items(self, items: Sequence[torch.Tensor], grids: Sequence[Grid],
                      share: list[int]) -> torch.Tensor:
        """The embeddings of the items `share` indexes, in order; none (a rank left without
        items still joins the gather) gives [0, out_hidden_size]."""
        if not share:
            return self.downsample.weight.new_empty(0, self.cfg.out_hidden_size)
        return self._encode(torch.cat([items[i] for i in share]), [grids[i] for i in share])

    def _encode(self, pixels: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        """The tower on this rank: every item of `grids`, all of its layers."""
        frames = [(h, w) for t, h, w in grids for _ in range(t)]
        seg_lens = [h * w for h, w in frames]
        x = self.post_conv_layernorm(self.patch_embed(pixels))
        pos, cos, sin = self._positions(frames, x.device)
        x = x + pos
        blocks: list[VisionBlock] = list(self.blocks)  # type: ignore[arg-type]
        normed = blocks[0].norm1(x)
        for i, block in enumerate(blocks):
            next_norm = blocks[i + 1].norm1 if i + 1 < len(blocks) else self.post_layernorm
            x, normed = block.forward_normed(x, normed, cos, sin, seg_lens, next_norm)
        x = normed  # post_layernorm(x)
        m, hidden = self.cfg.spatial_merge_size, self.cfg.hidden_size
        x = x.view(-1, m, m, hidden).permute(0, 3, 1, 2).flatten(1)  # [P/m^2, hidden*m*m]
        return self.merger(self.downsample(x))

    def _positions(self, frames: list[tuple[int, int]], device: torch.device) -> GridTables:
        """Every patch's resampled position embedding [P, hidden] and its rotary cos and sin
        [P, head_dim] (fp32), from the tables of each frame's grid."""
        if len(frames) == 1:
            return self._grid_tables(*frames[0], device)
        pos, cos, sin = zip(*(self._grid_tables(h, w, device) for h, w in frames), strict=True)
        return torch.cat(pos), torch.cat(cos), torch.cat(sin)

    def _grid_tables(self, h: int, w: int, device: torch.device) -> GridTables:
        """One grid's tables, kept for the next image of that size (a bicubic resampling of
        the position table per call otherwise: ~3 ms for a 448x448 image); the key holds the
        table's version, so loading new weights makes them anew."""
        table = self.embeddings.position_embedding.weight
        try:
            version = table._version
        except RuntimeError:  # an inference tensor: it keeps no version (nor changes)
            version = -1
        key = (h, w, str(device), table.data_ptr(), version, table.dtype)
        tables = self._grids.get(key)
        if tables is None:
            hw = block_major_hw(h, w, self.cfg.spatial_merge_size, device)
            pos = self.embeddings.for_grid(hw, h, w).to(device)
            cos, sin = self.rotary_pos_emb.cos_sin(hw)
            tables = (pos, cos, sin)
            self._grids[key] = tables
            if len(self._grids) > self.GRID_CACHE_SIZE:
                self._grids.popitem(last=False)
        else:
            self._grids.move_to_end(key)
        return tables
