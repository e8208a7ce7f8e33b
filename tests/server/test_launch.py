"""`glmv serve`'s start-up: the heap built while loading leaves the cyclic collector's reach."""

from __future__ import annotations

import subprocess
import sys


def test_startup_heap_is_frozen() -> None:
    """freeze_startup_heap moves every object alive at start-up into the permanent generation
    (run in a child process: freezing is process-wide)."""
    code = (
        "import gc\n"
        "from glmv.server.launch import freeze_startup_heap\n"
        "kept = [[i] for i in range(1000)]\n"
        "assert gc.get_freeze_count() == 0\n"
        "freeze_startup_heap()\n"
        "assert gc.get_freeze_count() >= 1000, gc.get_freeze_count()\n"
        "walked = {id(o) for g in range(3) for o in gc.get_objects(g)}\n"
        "assert gc.is_tracked(kept[0]) and id(kept[0]) not in walked\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
