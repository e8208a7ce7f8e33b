"""`glmv serve`: load the model, build the app, run uvicorn on one process.

Shutdown (SIGTERM or SIGINT) drains: the listening socket closes at once (new connections are
refused) and a request that still reaches the app, on a connection opened before, gets 503;
requests already accepted run on until they finish or `--shutdown-timeout` seconds have passed.
At that deadline every request left ends with a 503 (a stream with an in-band error event and
`[DONE]`), its KV blocks are freed, the engine thread stops and the process exits with status 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import signal
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType

import uvicorn

from glmv.engine.async_engine import AsyncEngine, AsyncEngineConfig
from glmv.engine.config import EngineArgs
from glmv.engine.parallel import is_worker_process, run_worker
from glmv.errors import ShuttingDownError
from glmv.multimodal.media import MediaPolicy
from glmv.server.app import build_app
from glmv.server.config import ServerConfig
from glmv.server.context import ServerContext

logger = logging.getLogger("glmv.server")
#: Seconds past the drain deadline before uvicorn cancels whatever still runs (a request the
#: deadline's abort cannot reach, such as one still fetching its media); a backstop only.
_CANCEL_GRACE_S = 5.0


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


def serve(args: ServeArgs) -> int:
    """Serve until stopped; the exit status (0 after a requested stop, 1 when the engine died).

    Under tensor parallelism only rank 0 serves; any other rank started with the same command
    (torchrun, another node) runs its share of the model here instead."""
    if is_worker_process(args.engine):
        run_worker(args.engine)
        return 0
    ctx = build_context(args)
    app = build_app(ctx)
    freeze_startup_heap()
    host, port = args.server.host, args.server.port
    url_host = f"[{host}]" if ":" in host else host
    print(f"glmv: serving {ctx.model_name!r} on http://{url_host}:{port} "
          f"(OpenAI API at /v1, max_model_len {ctx.model.max_model_len})", flush=True)
    drain = args.server.shutdown_timeout
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False,
                            timeout_graceful_shutdown=math.ceil(drain + _CANCEL_GRACE_S))
    server = DrainingServer(config, ctx, drain)
    ctx.engine.on_death = server.engine_died
    # The engine steps on this (the main) thread, HTTP runs on another: see AsyncEngine.
    ctx.engine.host()
    http = threading.Thread(target=_serve_http, args=(server, ctx), name="glmv-http")
    previous = {sig: signal.signal(sig, server.handle_exit)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        ctx.engine.run()
        http.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if server.died or server.failed else 0


def freeze_startup_heap() -> None:
    """Take everything built at start-up (the model's modules, the imported libraries: most of
    the process's Python objects, and alive as long as it is) out of the cyclic garbage
    collector's reach. A full collection walks every tracked object; over that heap it paused
    a step for tens of milliseconds (a 128-token prompt's first token: ~60 ms alone, 100-195
    ms once collections ran during it), now it walks only what requests leave behind."""
    gc.collect()
    gc.freeze()


def _serve_http(server: DrainingServer, ctx: ServerContext) -> None:
    """uvicorn's loop (on its own thread); the engine's loop ends with it, however it ends."""
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits so when it cannot start (it has said why)
        server.failed = exc.code not in (0, None)
    except BaseException:
        logger.exception("the HTTP server failed")
        server.failed = True
    finally:
        if not server.started:
            server.failed = True  # it never served (the port is taken, say)
        ctx.engine.stop()


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a bounded drain on shutdown, exiting with status 0.

    uvicorn alone waits for open connections up to its graceful timeout and then cancels their
    tasks, cutting streams without a word; here the requests left at the deadline are ended
    through the engine instead, so each gets its error and its blocks back. uvicorn re-raises
    the signal after its shutdown, so the process would die of it (status -15, or a
    KeyboardInterrupt traceback); a requested stop that completed cleanly is a clean exit for a
    service manager.
    """

    def __init__(self, config: uvicorn.Config, ctx: ServerContext,
                 shutdown_timeout: float) -> None:
        super().__init__(config)
        self.ctx = ctx
        self.shutdown_timeout = shutdown_timeout
        self.died = False
        self.failed = False  # uvicorn raised, or never started serving

    def engine_died(self, error: Exception) -> None:
        """From the engine thread, once it cannot go on (a rank died): every request has its
        503 already; stop serving, exit with status 1."""
        logger.critical("the engine stopped (%s); shutting the server down", error)
        self.died = True
        self.ctx.draining = True
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.ctx.draining = True  # refuse at once, before uvicorn's loop notices the signal
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.ctx.draining = True
        logger.info("shutting down: new requests are refused; %d in flight may run for up to "
                    "%g s (--shutdown-timeout)", self.ctx.engine.num_unfinished,
                    self.shutdown_timeout)
        deadline = asyncio.get_running_loop().call_later(self.shutdown_timeout,
                                                         self._end_remaining)
        try:
            await super().shutdown(sockets)
        finally:
            deadline.cancel()

    def _end_remaining(self) -> None:
        left = self.ctx.engine.num_unfinished
        if left:
            logger.warning("--shutdown-timeout (%g s) passed: ending %d requests still in "
                           "flight", self.shutdown_timeout, left)
        self.ctx.engine.abort_all(ShuttingDownError(
            f"the server is shutting down and this request did not finish within its "
            f"--shutdown-timeout of {self.shutdown_timeout:g} s; retry it"))

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()
