"""Registry of attention backends: name -> function with the `sdpa_attention` signature."""

from __future__ import annotations

from collections.abc import Callable

import torch

from glmv.attention.metadata import AttentionMetadata
from glmv.attention.torch_sdpa import sdpa_attention

AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float, torch.Tensor | None],
    torch.Tensor,
]

BACKENDS: dict[str, AttentionFn] = {"torch_sdpa": sdpa_attention}


def get_backend(name: str) -> AttentionFn:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(BACKENDS)}") from None
