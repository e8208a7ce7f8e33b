"""`glmv serve`: load the model, build the app, run uvicorn on one process."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from glmv.engine.async_engine import AsyncEngine, AsyncEngineConfig
from glmv.engine.config import EngineArgs
from glmv.multimodal.media import MediaPolicy
from glmv.server.app import build_app
from glmv.server.config import ServerConfig
from glmv.server.context import ServerContext

logger = logging.getLogger("glmv.server")


@dataclass(frozen=True)
class ServeArgs:
    """Everything `glmv serve` needs, each part built from its own flags."""

    engine: EngineArgs
    server: ServerConfig
    media: MediaPolicy
    async_engine: AsyncEngineConfig


def build_context(args: ServeArgs) -> ServerContext:
    """Load the checkpoint and wrap it for serving (the engine thread starts with the app)."""
    engine = AsyncEngine.from_args(args.engine, args.media, args.async_engine)
    return ServerContext(engine, args.server, _default_name(args.engine.model))


def _default_name(model: str) -> str:
    return model.rstrip("/")


def serve(args: ServeArgs) -> None:
    ctx = build_context(args)
    app = build_app(ctx)
    host, port = args.server.host, args.server.port
    url_host = f"[{host}]" if ":" in host else host
    print(f"glmv: serving {ctx.model_name!r} on http://{url_host}:{port} "
          f"(OpenAI API at /v1, max_model_len {ctx.model.max_model_len})", flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=30)
    _CleanExitServer(config).run()


class _CleanExitServer(uvicorn.Server):
    """uvicorn's server, but a shutdown asked for by SIGTERM/SIGINT exits with status 0.

    uvicorn re-raises the signal after its graceful shutdown, so the process would die of it
    (status -15, or a KeyboardInterrupt traceback); a requested stop that completed cleanly is a
    clean exit for a service manager.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()
