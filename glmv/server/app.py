"""The FastAPI application: routes, API keys, error mapping. Logic lives in the serving modules.

    GET  /health /version /v1/models /metrics
    POST /v1/chat/completions /v1/completions /tokenize /generate
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from glmv.errors import GlmvError, QueueFullError, ShuttingDownError
from glmv.server import serving_chat, serving_completion
from glmv.server.body_limit import BodyLimit
from glmv.server.context import ClientDisconnected, ServerContext
from glmv.server.errors import error_response, from_exception
from glmv.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    TokenizeRequest,
)
from glmv.version import __version__

logger = logging.getLogger(__name__)
#: The chat page's files (index.html, app.js, style.css), shipped inside the package.
STATIC_DIR = Path(__file__).parent / "static"
#: Paths anyone may reach: the load balancer's probe and the chat page with its assets.
_OPEN_PATHS = ("/health",)
_OPEN_PREFIXES = ("/static/",)


def _authorized(request: Request, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison against every key (no early exit on the first match)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip() if scheme.lower() == "bearer" else request.headers.get(
        "x-api-key", "")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


def build_app(ctx: ServerContext) -> FastAPI:
    """The app over a running (or startable) engine; the engine thread starts with the app."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        ctx.engine.start()
        try:
            yield
        finally:
            ctx.engine.shutdown()

    app = FastAPI(title="glmv", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for GLM-V vision-language models")
    app.state.ctx = ctx
    _add_middleware(app, ctx)
    app.add_middleware(BodyLimit, max_bytes=ctx.config.max_request_bytes)
    _add_error_handlers(app)
    _add_routes(app, ctx)
    _add_page(app)
    return app


def _add_middleware(app: FastAPI, ctx: ServerContext) -> None:
    keys = ctx.config.api_keys

    @app.middleware("http")
    async def guard(request: Request,
                    call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        path = request.url.path
        is_open = path in _OPEN_PATHS or path == "/" or path.startswith(_OPEN_PREFIXES)
        if keys and not is_open and not _authorized(request, keys):
            response: Response = error_response(
                401, "missing or invalid API key (send Authorization: Bearer <key>)")
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        label = getattr(route, "path", "other")
        ctx.metrics.http_requests.labels(label, str(response.status_code)).inc()
        return response


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc.errors())

    @app.exception_handler(ValidationError)
    async def invalid_inside(_: Request, exc: ValidationError) -> JSONResponse:
        # A body valid for its route but not for a model built from it later (e.g. /tokenize's
        # chat request): still the client's input, so a 422, never a 500.
        return _validation_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ClientDisconnected)
    async def gone(_: Request, exc: ClientDisconnected) -> JSONResponse:
        return error_response(499, "client disconnected")

    @app.exception_handler(GlmvError)
    async def typed_error(_: Request, exc: GlmvError) -> JSONResponse:
        status, message, param = from_exception(exc)
        return error_response(status, message, param)

    @app.exception_handler(Exception)
    async def any_error(_: Request, exc: Exception) -> JSONResponse:
        status, message, param = from_exception(exc)
        return error_response(status, message, param)


def _validation_response(errors: Sequence[Any]) -> JSONResponse:
    """422 naming up to five problems; `param` is the first one's field."""
    problems = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    first = errors[0].get("loc", ()) if errors else ()
    param = ".".join(str(p) for p in first if p != "body") or None
    return error_response(422, "invalid request: " + "; ".join(problems), param)


def _check_capacity(ctx: ServerContext) -> None:
    """Refuse before any media work when the server is full or shutting down (503, fast)."""
    if ctx.draining:
        raise ShuttingDownError("the server is shutting down and takes no new requests; "
                                "retry on another instance")
    if ctx.engine.num_unfinished >= ctx.engine.config.max_queue_len:
        raise QueueFullError(f"the server is at its limit of {ctx.engine.config.max_queue_len} "
                             "requests in flight (--max-queue-len); retry later")


def _add_page(app: FastAPI) -> None:
    """The chat page at / and its assets under /static/ (shipped in the package, no CDN)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def _add_routes(app: FastAPI, ctx: ServerContext) -> None:
    @app.get("/health")
    async def health() -> Response:
        if ctx.draining:
            return error_response(503, "the server is shutting down")
        if not ctx.engine.is_alive:
            return error_response(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": ctx.created, "owned_by": "glmv",
                 "root": ctx.names[0], "parent": None, "max_model_len": ctx.model.max_model_len,
                 "glmv": ctx.capabilities()}
                for name in ctx.names]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        _check_capacity(ctx)
        return await serving_chat.chat_completion(ctx, body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_capacity(ctx)
        return await serving_completion.completion(ctx, body, request)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await serving_completion.tokenize(ctx, body)

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        _check_capacity(ctx)
        return await serving_completion.generate(ctx, body, request)
