"""glmv's fused CPU operators (C++, `csrc/cpu_ops.cpp`), built once on this machine.

A bf16 decode step on a few cores spends much of its time in the per-call overhead of small
PyTorch operators (norms, rotary, SwiGLU, attention gathers). `torch.ops.glmv.*` does each of
those chains in one call. The source is compiled on first use with the machine's C++ compiler
(through torch's extension builder and `ninja`) into `$GLMV_CACHE_DIR/kernels/`, keyed by the
source, torch's version and the CPU's features, and loaded from there afterwards.

The layers ask `cpu_ops(tensor)` and fall back to plain PyTorch when it returns None: not a
bf16 CPU tensor, `GLMV_CPU_KERNELS=0`, or the build failed (the reason is logged once).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from glmv.demo import cache_dir

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
LIBRARY_NAME = "glmv_cpu_ops"
# -ffp-contract=off: no fused multiply-adds the source does not ask for (as ATen is built), so
# that x*c + r*s rounds twice like the PyTorch code it must equal bit for bit.
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-fno-trapping-math",
          "-ffp-contract=off")
ENV_SWITCH = "GLMV_CPU_KERNELS"  # "0" turns the kernels off
AMX_SWITCH = "GLMV_AMX"  # "0" keeps the products and attention off AMX tiles
# "avx512": build for AVX-512 without AVX512-BF16 and AMX even where the CPU has them (the path
# of CPUs without them, e.g. to test it on one that has them)
ISA_SWITCH = "GLMV_CPU_ISA"
NO_BF16_FLAGS = ("-mno-avx512bf16", "-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8")
NEVER = 1 << 40  # a row count no product reaches (linear_amx_rows)


class _State:
    ops: Any | None = None
    tried = False
    error: str | None = None


def cpuinfo_line(key: str) -> str | None:
    """The first line of /proc/cpuinfo that starts with `key` ("flags", "model name"), or None
    where there is no such file or line."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line
    return None


def _cpu_features() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    return cpuinfo_line("flags") or platform.processor()


def cflags() -> list[str]:
    """The compiler flags: CFLAGS, less the bf16 instructions under GLMV_CPU_ISA=avx512."""
    isa = os.environ.get(ISA_SWITCH, "native")
    if isa not in ("native", "avx512"):
        raise ValueError(f"{ISA_SWITCH}={isa!r}: choose native or avx512")
    return list(CFLAGS) + (list(NO_BF16_FLAGS) if isa == "avx512" else [])


def build_key() -> str:
    digest = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), " ".join(cflags()).encode(),
                 _cpu_features().encode(), sys.version.encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def library_path() -> Path:
    return cache_dir() / "kernels" / f"{LIBRARY_NAME}-{build_key()}" / f"{LIBRARY_NAME}.so"


def _build(target: Path) -> None:
    """Compile the source into `target` (atomically: a finished file or none)."""
    from torch.utils import cpp_extension

    work = target.parent / f"build-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"glmv: compiling CPU kernels (once, about half a minute) into {target.parent}",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        built = cpp_extension.load(LIBRARY_NAME, sources=[str(SOURCE)],
                                   extra_cflags=cflags(), build_directory=str(work),
                                   is_python_module=False, verbose=False)
        os.replace(built if isinstance(built, str) else work / f"{LIBRARY_NAME}.so", target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("compiled glmv CPU kernels in %.1f s", time.perf_counter() - start)


def load() -> Any:
    """Build (if needed) and load the library; returns torch.ops.glmv. Raises on failure."""
    target = library_path()
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target.parent / ".lock", "w") as lock:  # one builder among processes
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not target.is_file():
                _build(target)
    if not hasattr(torch.ops.glmv, "rms_norm"):  # loaded already by the builder
        torch.ops.load_library(str(target))
    return torch.ops.glmv


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def get_ops() -> Any | None:
    """torch.ops.glmv, or None when the kernels are off or could not be built."""
    if not _State.tried:
        _State.tried = True
        if not enabled():
            _State.error = f"{ENV_SWITCH}=0"
        else:
            try:
                _State.ops = load()
                if os.environ.get(AMX_SWITCH, "1") == "0":
                    _State.ops.linear_amx_rows(NEVER, NEVER)
            except Exception as exc:  # any build failure means: fall back
                _State.error = f"{type(exc).__name__}: {exc}"
                logger.warning("glmv CPU kernels unavailable, using plain PyTorch (%s)",
                               _State.error.splitlines()[0][:300])
    return _State.ops


def cpu_ops(x: torch.Tensor) -> Any | None:
    """The fused ops if they apply to `x` (a bf16 CPU tensor) and are available, else None."""
    if x.dtype is not torch.bfloat16 or x.device.type != "cpu":
        return None
    return _State.ops if _State.tried else get_ops()


def amx() -> bool:
    """Whether the products and attention run on AMX tiles (from a few rows up): the CPU has
    them, the kernels were built for them, and `GLMV_AMX=0` is not set."""
    ops = get_ops()
    return ops is not None and bool(ops.linear_amx()) and os.environ.get(AMX_SWITCH, "1") != "0"


def status() -> str:
    """One line for logs and benchmarks: loaded (on AMX or not), off, or why not."""
    if get_ops() is None:
        return f"not used ({_State.error})"
    return "loaded (AMX)" if amx() else "loaded"
