"""Fixtures for the HTTP server tests: an app over a tiny checkpoint, in process.

`server_client(variant, **options)` returns a started `fastapi.testclient.TestClient` (the
engine thread runs while the test runs) over a fresh ServerContext; options are fields of
ServerConfig, AsyncEngineConfig, MediaPolicy or EngineArgs, routed by name. `scripted=True`
builds it over `ScriptedEngine`, whose replies are set by the test.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from fastapi.testclient import TestClient

from glmv.engine.async_engine import AsyncEngine, AsyncEngineConfig
from glmv.engine.config import EngineArgs
from glmv.engine.llm_engine import LLMEngine
from glmv.multimodal.media import MediaPolicy
from glmv.server.app import build_app
from glmv.server.config import ServerConfig
from glmv.server.context import ServerContext
from tests.server.fakes import ScriptedEngine

ClientFactory = Callable[..., TestClient]


def _split(options: dict[str, Any]) -> list[dict[str, Any]]:
    """Options per settings class; a name several classes share (max_queue_len) goes to each."""
    parts: list[dict[str, Any]] = []
    used: set[str] = set()
    for cls in (ServerConfig, AsyncEngineConfig, MediaPolicy, EngineArgs):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        parts.append({k: v for k, v in options.items() if k in names})
        used |= names
    if set(options) - used:
        raise TypeError(f"unknown server options: {sorted(set(options) - used)}")
    return parts


def start_client(stack: ExitStack, tiny_checkpoint: Any, variant: str = "glm-4.6v",
                 scripted: bool = False, **options: Any) -> TestClient:
    """A started TestClient over a new server; closed (engine stopped) by `stack`."""
    server, async_cfg, media, engine_kw = _split(dict(options))
    engine_kw = {"kv_cache_memory": 0.02, "max_model_len": 2048, "dtype": "float32",
                 "show_progress": False, **engine_kw}
    args = EngineArgs(model=str(tiny_checkpoint(variant)), **engine_kw)
    llm = LLMEngine.from_args(args, MediaPolicy(**media))
    cls = ScriptedEngine if scripted else AsyncEngine
    engine = cls(llm, AsyncEngineConfig(**async_cfg))
    ctx = ServerContext(engine, ServerConfig(**server), "tiny")
    return stack.enter_context(TestClient(build_app(ctx)))


@pytest.fixture
def server_client(tiny_checkpoint: Any) -> Iterator[ClientFactory]:
    """`(variant="glm-4.6v", scripted=False, **options) -> TestClient`, per test."""
    with ExitStack() as stack:
        yield functools.partial(start_client, stack, tiny_checkpoint)
