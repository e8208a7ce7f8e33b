"""Where a C++ compiler is at hand the kernels must build: every kernel test skips when they
do not (as glmv falls back to PyTorch), so a source that no longer compiles would otherwise
pass the suite unnoticed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glmv import kernels


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
@pytest.mark.skipif(not kernels.enabled(), reason=f"{kernels.ENV_SWITCH}=0")
def test_kernels_build_where_a_compiler_is_at_hand() -> None:
    assert kernels.get_ops() is not None, kernels.status()


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
@pytest.mark.skipif(not kernels.enabled(), reason=f"{kernels.ENV_SWITCH}=0")
def test_the_avx512_build_without_bf16_instructions_passes_the_kernel_tests() -> None:
    """CPUs with AVX-512 but without AVX512-BF16 (Skylake-SP to Ice Lake, and hosts that hide
    it) run the same kernels on AVX512F arithmetic: on a CPU with AVX512-BF16 that build is
    made with GLMV_CPU_ISA=avx512 and must pass the kernel and product tests as well."""
    ops = kernels.get_ops()
    if ops is None or not ops.bf16_linear_native():
        pytest.skip("this CPU has no AVX-512: the kernels run their plain loops")
    if not ops.bf16_instructions():
        pytest.skip("this CPU has no AVX512-BF16: the whole suite already runs the AVX512F path")
    env = dict(os.environ, **{kernels.ISA_SWITCH: "avx512"})
    probe = subprocess.run(
        [sys.executable, "-c", "from glmv import kernels; o = kernels.get_ops(); "
         "print(o.bf16_linear_native(), o.bf16_instructions(), o.linear_amx())"],
        env=env, capture_output=True, text=True, timeout=600, check=True)
    assert probe.stdout.split() == ["True", "False", "False"], probe.stdout + probe.stderr
    tests = ["tests/kernels/test_cpu_ops.py", "tests/layers/test_linear_packing.py",
             "tests/layers/test_quantization.py", "tests/runner/test_greedy_lm_head.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
