"""The built-in demo checkpoint: a tiny random-weight model written on first use.

`--model demo` (the default of `glmv generate`) means the glm-4.6v-flash tiny checkpoint;
`--model demo:<variant>` picks another variant. It lives in $GLMV_CACHE_DIR (default
~/.cache/glmv) and is rebuilt when the writer's format changes. Its weights are random: the
output is meaningless, which every command using it says.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from glmv.errors import CheckpointError, GlmvError
from glmv.tiny.variants import VARIANTS
from glmv.tiny.writer import FORMAT_VERSION, TinyCheckpointSpec, write_checkpoint

DEMO_PREFIX = "demo"
DEFAULT_DEMO_VARIANT = "glm-4.6v-flash"


def cache_dir() -> Path:
    return Path(os.environ.get("GLMV_CACHE_DIR", Path.home() / ".cache" / "glmv"))


def is_demo(model: str) -> bool:
    return model == DEMO_PREFIX or model.startswith(DEMO_PREFIX + ":")


def demo_checkpoint(model: str = DEMO_PREFIX) -> Path:
    """Path of the demo checkpoint named by `model`, writing it first if needed."""
    variant = model.partition(":")[2] or DEFAULT_DEMO_VARIANT
    if variant not in VARIANTS:
        raise GlmvError(f"unknown demo variant {variant!r}; choose from {', '.join(VARIANTS)}")
    path = cache_dir() / f"demo-{variant}-tiny-v{FORMAT_VERSION}"
    if (path / "README.md").is_file():
        return path
    print(f"glmv: writing the demo checkpoint {variant} (RANDOM WEIGHTS) to {path}",
          file=sys.stderr)
    try:
        _write_atomically(path, variant)
    except OSError as exc:
        raise CheckpointError(f"cannot write the demo checkpoint to {str(path)!r} ({exc}); "
                              "set GLMV_CACHE_DIR to a writable folder") from exc
    return path


def _write_atomically(path: Path, variant: str) -> None:
    """Write beside the target and rename, so a half-written folder is never used."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        write_checkpoint(tmp, TinyCheckpointSpec(variant, "tiny", seed=0))
        try:
            tmp.rename(path)
        except OSError:
            if not (path / "README.md").is_file():  # lost a race to another writer
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
