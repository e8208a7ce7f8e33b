"""Where a C++ compiler is at hand the kernels must build: every kernel test skips when they
do not (as glmv falls back to PyTorch), so a source that no longer compiles would otherwise
pass the suite unnoticed."""

from __future__ import annotations

import shutil

import pytest

from glmv import kernels


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
@pytest.mark.skipif(not kernels.enabled(), reason=f"{kernels.ENV_SWITCH}=0")
def test_kernels_build_where_a_compiler_is_at_hand() -> None:
    assert kernels.get_ops() is not None, kernels.status()
