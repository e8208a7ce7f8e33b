"""Tensors in 2 MiB pages (glmv.kernels.memory): alignment, the kernel's flag, lifetime."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from glmv.kernels import memory
from glmv.layers.linear import Bf16Blocks

needs_thp = pytest.mark.skipif(not memory.huge_pages_available(),
                               reason="transparent huge pages are off or unsupported here")


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds `address` (Linux smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_large_tensor_starts_on_a_huge_page_the_kernel_was_asked_to_use() -> None:
    t = memory.huge_page_empty((3, 1 << 20), torch.bfloat16)  # 6 MiB
    assert t.shape == (3, 1 << 20) and t.dtype is torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % memory.HUGE_PAGE == 0
    assert "hg" in _vm_flags(t.data_ptr())  # madvise(MADV_HUGEPAGE) took
    t.fill_(1.5)
    assert float(t.float().sum()) == 1.5 * t.numel()


@needs_thp
def test_memory_lives_as_long_as_any_view() -> None:
    view = memory.huge_page_empty((1 << 21,), torch.float32)[5:9]
    gc.collect()
    view.copy_(torch.arange(4.0))  # still mapped: the view holds the map
    assert view.tolist() == [0.0, 1.0, 2.0, 3.0]


def test_small_tensors_and_the_switch_give_ordinary_tensors(monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    small = memory.huge_page_empty((4, 8), torch.float32)
    assert small.shape == (4, 8)
    monkeypatch.setenv(memory.ENV_SWITCH, "0")
    assert not memory.huge_pages_available()
    big = memory.huge_page_empty((1 << 21,), torch.float32)
    assert big.shape == (1 << 21,)
    assert "hg" not in _vm_flags(big.data_ptr())


@pytest.mark.parametrize("rows", [8, 1 << 12])  # below and above one huge page
def test_copy_equals_its_source_whatever_its_strides(rows: int) -> None:
    source = torch.randn(512, rows).t()  # non-contiguous
    copy = memory.huge_page_copy(source)
    assert copy.is_contiguous() and torch.equal(copy, source)


@needs_thp
def test_packed_weights_live_in_huge_pages() -> None:
    weight = torch.randn(2048, 1024).bfloat16()  # 4 MiB
    blocks = Bf16Blocks.pack(weight, None)
    assert blocks.blocks.data_ptr() % memory.HUGE_PAGE == 0
    assert torch.equal(blocks.rows(), weight)
