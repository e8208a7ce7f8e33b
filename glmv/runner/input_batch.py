"""Flattening the work of one step (chunks of many sequences) into model inputs.

    chunk 0: tokens [s0, e0) of seq A | chunk 1: tokens [s1, e1) of seq B | ...
    input_ids   [N]      token ids, concatenated
    positions   [3, N]   M-RoPE positions
    slot_mapping[N]      block_table[i // block_size] * block_size + i % block_size
    block_tables[S, B]   padded with 0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmv.attention.metadata import AttentionMetadata


@dataclass
class SeqChunk:
    """The new tokens one sequence computes this step."""

    token_ids: list[int]  # tokens to run
    positions: torch.Tensor  # [3, len(token_ids)]
    start: int  # sequence index of token_ids[0] (tokens before it are in the KV cache)
    block_table: list[int]  # KV blocks of the sequence, enough for start + len(token_ids)
    vision_embeds: torch.Tensor | None = None  # [k, hidden] rows for the masked tokens
    vision_mask: torch.Tensor | None = None  # [len(token_ids)] bool: rows taking vision_embeds

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)


@dataclass
class StepInputs:
    """Model inputs for one forward over all chunks."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [3, N]
    meta: AttentionMetadata
    vision_embeds: torch.Tensor | None  # [K, hidden] in token order
    vision_mask: torch.Tensor | None  # [N] bool


def slot_mapping(chunk: SeqChunk, block_size: int) -> list[int]:
    slots = []
    for i in range(chunk.start, chunk.end):
        block = chunk.block_table[i // block_size]
        slots.append(block * block_size + i % block_size)
    return slots


def build_step_inputs(chunks: list[SeqChunk], block_size: int,
                      device: torch.device | str) -> StepInputs:
    ids: list[int] = []
    slots: list[int] = []
    starts = [0]
    seq_lens = []
    for chunk in chunks:
        ids.extend(chunk.token_ids)
        slots.extend(slot_mapping(chunk, block_size))
        starts.append(len(ids))
        seq_lens.append(chunk.end)
    width = max(len(c.block_table) for c in chunks)
    tables = torch.tensor([c.block_table + [0] * (width - len(c.block_table)) for c in chunks],
                          dtype=torch.int32)
    meta = AttentionMetadata(
        query_start_loc=starts, seq_lens=seq_lens,
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_tables=tables.to(device), block_size=block_size,
    )
    vision = [c for c in chunks if c.vision_embeds is not None]
    mask = embeds = None
    if vision:
        mask = torch.cat([c.vision_mask if c.vision_mask is not None
                          else torch.zeros(len(c.token_ids), dtype=torch.bool) for c in chunks])
        embeds = torch.cat([c.vision_embeds for c in vision])  # type: ignore[misc]
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.cat([c.positions for c in chunks], dim=1).to(device),
        meta=meta,
        vision_embeds=embeds,
        vision_mask=mask.to(device) if mask is not None else None,
    )
