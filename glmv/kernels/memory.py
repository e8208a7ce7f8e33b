"""CPU tensors in memory backed by 2 MiB pages, for the weights every decode step streams.

A decode step reads every weight once. With 4 KiB pages that is a TLB miss (a page walk) every
64 cache lines, and the hardware prefetchers restart at each page; with 2 MiB pages a long
product reads 15-25% faster on the machine docs/benchmarks.md describes (the LM head's one
310 MB product: 26.5 -> 33 GB/s). Linux backs anonymous memory with huge pages only where it is
asked to (transparent huge pages in `madvise` mode, the common default), so glmv maps the
memory itself, aligned to 2 MiB, and asks with `madvise(MADV_HUGEPAGE)`. Where that is not
possible (another OS, THP `never`, `GLMV_HUGE_PAGES=0`) the tensors are ordinary ones.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
ENV_SWITCH = "GLMV_HUGE_PAGES"  # "0": ordinary allocations
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether `madvise(MADV_HUGEPAGE)` can take effect here (and is not switched off)."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in setting


def huge_page_empty(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; 2 MiB pages back it where `huge_pages_available()` and it
    is at least one such page long (smaller ones are ordinary tensors)."""
    count = 1
    for size in shape:
        count *= size
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGE_PAGE or not huge_pages_available():
        return torch.empty(shape, dtype=dtype)
    span = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # Room to start on a 2 MiB boundary; the tensor keeps the map alive (torch.frombuffer
    # holds a reference to it) and unmapping follows when the last view is gone.
    buffer = mmap.mmap(-1, span + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = ctypes.c_char.from_buffer(buffer)
    offset = -ctypes.addressof(view) % HUGE_PAGE
    del view  # (an exported pointer would keep the map from ever closing)
    buffer.madvise(mmap.MADV_HUGEPAGE, offset, span)
    flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
    return flat.view(shape)


def huge_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` copied (contiguous) into `huge_page_empty` memory; a CPU tensor too small for a
    huge page, or any other device's, comes back as `tensor.contiguous()`."""
    if (tensor.device.type != "cpu" or tensor.numel() * tensor.element_size() < HUGE_PAGE
            or not huge_pages_available()):
        return tensor.contiguous()
    return huge_page_empty(tensor.shape, tensor.dtype).copy_(tensor)
