"""3-D (t, h, w) positions of a prompt for M-RoPE, as transformers' `get_rope_index` computes them.

The prompt is cut into runs: text tokens, and runs of <|image|> tokens (one run per image and
one per video frame pair; frames are separated by <|end_of_image|>, timestamp text and
<|begin_of_image|>). With a running start s:
- a text run of length L gets s, s+1, ..., s+L-1 on all three axes; s += L;
- a vision run with grid (1, gh, gw) and merge m gets, for token (row, col) of the
  (gh/m) x (gw/m) grid in row-major order: t = s, h = s + row, w = s + col; s += max(gh, gw)/m.

    tokens:  text text | img img img img img img | text
    t:        0    1   |  2   2   2   2   2   2  |  5
    h:        0    1   |  2   2   2   3   3   3  |  5
    w:        0    1   |  2   3   4   2   3   4  |  5        (grid 1 x 4 x 6, m = 2)

After the prompt, token i is at i + delta on every axis, delta = max position + 1 - length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glmv.errors import PromptError

Grid = tuple[int, int, int]


def token_types(input_ids: torch.Tensor, image_token_id: int, video_start_id: int,
                video_end_id: int) -> torch.Tensor:
    """0 = text, 1 = image placeholder, 2 = image placeholder inside a video span."""
    ids = input_ids.long()
    inside_video = torch.cumsum(ids == video_start_id, 0) > torch.cumsum(ids == video_end_id, 0)
    types = torch.zeros_like(ids)
    is_image = ids == image_token_id
    types[is_image & ~inside_video] = 1
    types[is_image & inside_video] = 2
    return types


def _runs(types: torch.Tensor) -> list[tuple[int, int, int]]:
    """(type, start, end) of each maximal run of equal types."""
    if types.numel() == 0:
        return []
    change = torch.nonzero(types[1:] != types[:-1]).flatten() + 1
    bounds = [0, *change.tolist(), types.numel()]
    values = types[torch.tensor(bounds[:-1])].tolist()
    return [(v, s, e) for v, s, e in zip(values, bounds[:-1], bounds[1:], strict=True)]


def vision_positions(start: int, grid_h: int, grid_w: int, merge: int) -> torch.Tensor:
    """[3, (gh/m)*(gw/m)] positions of one image or frame pair starting at `start`."""
    lh, lw = grid_h // merge, grid_w // merge
    rows = torch.arange(lh)[:, None].expand(lh, lw).flatten()
    cols = torch.arange(lw)[None, :].expand(lh, lw).flatten()
    return torch.stack((torch.zeros_like(rows), rows, cols)) + start


def mrope_positions(
    input_ids: Sequence[int] | torch.Tensor,
    image_grids: Sequence[Grid],
    video_grids: Sequence[Grid],
    *,
    image_token_id: int,
    video_start_id: int,
    video_end_id: int,
    spatial_merge_size: int,
) -> tuple[torch.Tensor, int]:
    """positions [3, len(input_ids)] int64 and the decode delta.

    image_grids / video_grids are (t, h, w) in prompt order; a video grid with t temporal
    patches stands for t runs of grid (1, h, w).
    """
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    types = token_types(ids, image_token_id, video_start_id, video_end_id)
    m = spatial_merge_size
    grids = {1: iter(list(image_grids)),
             2: iter([(1, h, w) for t, h, w in video_grids for _ in range(t)])}
    pieces = []
    start = 0
    for kind, begin, end in _runs(types):
        length = end - begin
        if kind == 0:
            pieces.append(torch.arange(start, start + length).expand(3, length))
            start += length
            continue
        grid = next(grids[kind], None)
        name = "image" if kind == 1 else "video frame"
        if grid is None:
            raise PromptError(f"the prompt has more {name} placeholder runs than {name}s")
        _, gh, gw = grid
        if length != (gh // m) * (gw // m):
            raise PromptError(f"{name} run of {length} placeholders does not match grid "
                              f"{gh}x{gw} ({(gh // m) * (gw // m)} tokens)")
        pieces.append(vision_positions(start, gh, gw, m))
        start += max(gh, gw) // m
    for kind, name in ((1, "image"), (2, "video frame")):
        if next(grids[kind], None) is not None:
            raise PromptError(f"more {name}s were given than the prompt has placeholders for")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - ids.numel() if ids.numel() else 0
    return positions, delta


def decode_positions(first_index: int, count: int, delta: int) -> torch.Tensor:
    """[3, count] positions of tokens first_index .. first_index+count-1 after the prompt."""
    if count == 1:  # a decode token: one op instead of three (once per sequence per step)
        return torch.full((3, 1), first_index + delta, dtype=torch.long)
    return torch.arange(first_index, first_index + count).expand(3, count) + delta
