"""Launching ranks from outside: two `glmv generate` processes started the way torchrun starts
them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK), and as two "nodes" of glmv's own
launcher (--nnodes 2 --node-rank k); rank 0 prints what one process prints, the other rank
prints nothing and exits 0."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _command(checkpoint: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "glmv", "generate", "--model", str(checkpoint),
            "--prompt", "Tell me about parallel ranks.", "--max-tokens", "8", "--dtype",
            "float32", "--kv-cache-memory", "0.05", "--max-model-len", "2048", *flags]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def _run_ranks(commands: list[list[str]], envs: list[dict[str, str]]) -> list[str]:
    """Start every rank, wait for all; their stdout (each must exit 0)."""
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd, env in zip(commands, envs, strict=True)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=_TIMEOUT_S)
            assert proc.returncode == 0, err[-3000:]
            outputs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


@pytest.fixture(scope="module")
def single(tiny_checkpoint: Any) -> str:
    """What one process prints."""
    return _run_ranks([_command(tiny_checkpoint("glm-4.1v-thinking"))], [_env()])[0]


def test_torchrun_style_environment(tiny_checkpoint: Any, single: str) -> None:
    port = str(_free_port())
    command = _command(tiny_checkpoint("glm-4.1v-thinking"))
    envs = [_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port) for r in (0, 1)]
    rank0, rank1 = _run_ranks([command, command], envs)
    assert rank0 == single and single.strip()
    assert rank1 == ""


def test_two_nodes_with_glmvs_launcher(tiny_checkpoint: Any, single: str) -> None:
    port = str(_free_port())
    commands = [_command(tiny_checkpoint("glm-4.1v-thinking"), "--tensor-parallel-size", "2",
                         "--nnodes", "2", "--node-rank", str(node), "--master-addr",
                         "127.0.0.1", "--master-port", port) for node in (0, 1)]
    node0, node1 = _run_ranks(commands, [_env(), _env()])
    assert node0 == single
    assert node1 == ""
