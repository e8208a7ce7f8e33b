"""Shared fixtures: tiny random-weight checkpoints of every GLM-V variant, written once per session.

Usage from any test module (models, parity, multimodal, ...):

    from tests.conftest import VARIANTS

    @pytest.mark.parametrize("variant", VARIANTS)
    def test_something(tiny_checkpoint, variant):
        ckpt = tiny_checkpoint(variant)          # pathlib.Path of the checkpoint folder
        ...

`tiny_checkpoint(variant)` writes `TinyCheckpointSpec(variant, size="tiny", seed=0,
dtype="bfloat16")` the first time a variant is asked for and returns the same folder afterwards,
so each variant costs one write (well under a second) per session. The folders are shared:
treat them as read-only; copy one (`copy_checkpoint`) before changing files in it.
`tiny_checkpoint(variant, seed=1, fp8=True, ...)` builds other specs the same way (each distinct
spec is written once).
"""

from __future__ import annotations

import os

# The suite runs two workers on two cores and starts servers beside them, so the cores are
# always oversubscribed. libgomp's idle threads then spin away the CPU the others need (a
# streamed reply took 10x longer); a short spin, set before torch loads libgomp here and
# inherited by every server and rank the tests start, keeps them out of each other's way.
os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from glmv.tiny.variants import VARIANTS as _TINY_VARIANTS
from glmv.tiny.writer import TinyCheckpointSpec, write_checkpoint

#: The four published GLM-V variants, in the order tests are parametrized over.
VARIANTS: tuple[str, ...] = tuple(_TINY_VARIANTS)
#: variant -> file name of the chat template it ships (glmv/assets/chat_templates).
TEMPLATE_OF: dict[str, str] = {
    "glm-4.1v-thinking": "glm41v",
    "glm-4.5v": "glm45v",
    "glm-4.6v": "glm46v",
    "glm-4.6v-flash": "glm46v",
}
#: Variants whose tokenizer is the GLM-4.5 one (XML tool tags, /nothink, hybrid thinking).
GLM45_LAYOUT: tuple[str, ...] = ("glm-4.6v-flash", "glm-4.5v", "glm-4.6v")

TinyCheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> TinyCheckpointFactory:
    """A function `(variant, **spec_fields) -> Path` returning a cached tiny checkpoint folder."""
    cache: dict[TinyCheckpointSpec, Path] = {}

    def get(variant: str, **spec_fields: Any) -> Path:
        spec = TinyCheckpointSpec(variant, **{"size": "tiny", "seed": 0, **spec_fields})
        if spec not in cache:
            suffix = "-".join(f"{k}{v}" for k, v in sorted(spec_fields.items()))
            name = f"{variant}-{suffix}" if suffix else variant
            cache[spec] = write_checkpoint(tmp_path_factory.mktemp(name), spec)
        return cache[spec]

    return get


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A private copy of a shared checkpoint folder, for tests that edit or delete its files."""
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_checkpoint: TinyCheckpointFactory) -> Callable[[str], Any]:
    """`(variant) -> transformers AutoTokenizer` of the seed-0 tiny checkpoint, loaded once.

    Skips the test when transformers (the reference implementation) is not installed.
    """
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    return _loaded_once(lambda v: transformers.AutoTokenizer.from_pretrained(tiny_checkpoint(v)))


@pytest.fixture(scope="session")
def hf_processor(tiny_checkpoint: TinyCheckpointFactory) -> Callable[[str], Any]:
    """`(variant) -> transformers AutoProcessor` of the seed-0 tiny checkpoint, loaded once."""
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    return _loaded_once(lambda v: transformers.AutoProcessor.from_pretrained(tiny_checkpoint(v)))


def _loaded_once(load: Callable[[str], Any]) -> Callable[[str], Any]:
    """`load(variant)`, computed once per variant for the session."""
    cache: dict[str, Any] = {}

    def get(variant: str) -> Any:
        if variant not in cache:
            cache[variant] = load(variant)
        return cache[variant]

    return get


@pytest.fixture(params=["lanes", "amx"])
def product_path(request: pytest.FixtureRequest) -> Any:
    """glmv's two CPU product kernels (bf16 and int8), each forced for every row count: the
    lane-block stream (AVX512, or plain loops) and AMX tiles (where the CPU has them)."""
    from glmv.kernels import NEVER, get_ops

    ops = get_ops()
    if ops is None:
        pytest.skip("glmv's CPU kernels did not build")
    if request.param == "amx" and not ops.linear_amx():
        pytest.skip("this CPU (or this build of the kernels) has no AMX tiles")
    previous = ops.linear_amx_rows(*((1, 1) if request.param == "amx" else (NEVER, NEVER)))
    yield request.param
    ops.linear_amx_rows(*previous)
