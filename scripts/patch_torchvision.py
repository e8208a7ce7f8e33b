"""Let torchvision's pure-Python transforms import next to a CPU-only torch.

The test extra needs transformers' GLM-V video processors, which import torchvision. The only
torchvision on the package index here is a CUDA build; importing it beside CPU torch fails in
`torchvision/_meta_registrations.py`, which registers fake kernels for compiled ops that did
not load (`RuntimeError: operator torchvision::nms does not exist`). This rewrites those
registrations to be skipped when `torchvision.extension._has_ops()` is false. Idempotent.
glmv itself never imports torchvision.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

PATTERN = re.compile(r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$', re.MULTILINE)
REPLACEMENT = (
    r"@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))"
)


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision is not installed; nothing to patch")
        return 0
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    text = path.read_text()
    patched, count = PATTERN.subn(REPLACEMENT, text)
    if count:
        path.write_text(patched)
    print(f"torchvision: {count} fake-kernel registrations made conditional in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
