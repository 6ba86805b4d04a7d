"""The FastAPI app: OpenAI and native routes, /health, /metrics, API key, error JSON."""

from __future__ import annotations

import secrets
import time
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from starlette.responses import JSONResponse, Response

from lowbit.server import native_api, openai_api
from lowbit.server.engine_loop import EngineLoop
from lowbit.server.engine_process import EngineProcess
from lowbit.server.errors import APIError, install_error_handlers
from lowbit.server.metrics import Metrics
from lowbit.server.serving import ServerState, state_of

_ROUTES = {"/v1/completions", "/v1/chat/completions", "/generate", "/v1/models", "/health",
           "/metrics", "/get_model_info"}  # fmt: skip
_GENERATION = {"/v1/completions", "/v1/chat/completions", "/generate"}


async def _check_api_key(request: Request) -> None:
    """401 unless the request carries the server's API key as a bearer token."""
    key = state_of(request).api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), key):
        raise APIError(
            401, "missing or wrong API key; send the header 'Authorization: Bearer <key>' with "
            "the key given to --api-key", code="invalid_api_key",
        )  # fmt: skip


class _Observe:
    """ASGI middleware: counts requests by route and status, and times generation requests."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status, t0 = 500, time.perf_counter()

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope["path"] if scope["path"] in _ROUTES else "other"
            self.metrics.request(route, status)
            if route in _GENERATION and status == 200:
                self.metrics.e2e.observe(time.perf_counter() - t0)


def create_app(
    engine: EngineProcess,
    model_name: str,
    api_key: str | None = None,
    chat_template: str | None = None,
    stream_interval: int = 1,
    stall_timeout: float = 300.0,
) -> FastAPI:
    """An app serving a started engine process; the app's shutdown stops that process too."""
    metrics = Metrics(model_name)
    loop = EngineLoop(engine, metrics, stream_interval, stall_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="lowbit", lifespan=lifespan)
    app.state.server = ServerState(engine, loop, metrics, model_name, chat_template, api_key)
    install_error_handlers(app)
    app.add_middleware(_Observe, metrics=metrics)
    guarded = [Depends(_check_api_key)]
    app.include_router(openai_api.router, dependencies=guarded)
    app.include_router(native_api.router, dependencies=guarded)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine process runs (never needs the API key)."""
        if not loop.alive:
            return APIError(503, "the engine process is not running; restart the server").response()
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        """The one served model."""
        card = {"id": model_name, "object": "model", "created": int(time.time()),
                "owned_by": "lowbit", "root": str(engine.model_dir),
                "max_model_len": engine.context_length}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.get("/get_model_info", dependencies=guarded)
    async def model_info() -> dict:
        """SGLang's model info."""
        return {"model_path": str(engine.model_dir), "served_model_name": model_name,
                "is_generation": True, "context_length": engine.context_length}  # fmt: skip

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        """Prometheus exposition of the server's metrics."""
        if loop.last_stats is not None:  # the engine's latest occupancy, copied once a scrape
            metrics.observe_engine(loop.last_stats)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app
