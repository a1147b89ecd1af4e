"""`make_app(config, engine, state) -> web.Application`: the OpenAI-compatible HTTP API.

The engine must be constructed (model loaded). Its thread is started by the app's cleanup
context when not started yet, and then also shut down with the app; an engine started by the
caller (the daemon, tests sharing one engine) stays the caller's to shut down.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from appliance.config import AppConfig
from appliance.engine.async_engine import AsyncEngine
from appliance.server import routes_openai, routes_responses, routes_tokens
from appliance.server.context import (
    CONFIG_KEY,
    ENGINE_KEY,
    METRICS_KEY,
    PARSE_POOL_KEY,
    REQUEST_LOG_KEY,
    STATE_KEY,
    TOKEN_TEXTS_KEY,
)
from appliance.server.metrics import CONTENT_TYPE, ServerMetrics
from appliance.server.middleware import (
    auth_middleware,
    error_middleware,
    on_response_prepare,
    request_middleware,
)
from appliance.server.openapi import openapi_document
from appliance.server.quotas import retry_after_header
from appliance.server.request_log import RequestLog
from appliance.server.responses import TokenTexts
from appliance.server.state import ServiceState


async def health(request: web.Request) -> web.Response:
    """200 only while ready and the engine loop makes progress; 503 (+ Retry-After) otherwise."""
    state = request.app[STATE_KEY]
    engine = request.app[ENGINE_KEY]
    progressing = engine.is_progressing(state.stall_timeout_s)
    body = {"status": "ok" if state.phase == "ready" and progressing else "unavailable",
            "phase": state.phase, "engine": "dead" if engine.dead else ("ok" if progressing else "stalled")}
    if body["status"] == "ok":
        return web.json_response(body)
    return web.json_response(body, status=503, headers={"Retry-After": retry_after_header(
        state.drain_retry_after_s if state.phase == "draining" else 5.0)})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS_KEY].render(), headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


def make_app(config: AppConfig, engine: AsyncEngine, state: ServiceState | None = None) -> web.Application:
    if state is None:
        state = ServiceState("ready", stall_timeout_s=config.server.stall_timeout_s)
    state.set_clients(config.clients)
    state.set_server_limits(config.server)
    state.attach_engine(engine)
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[request_middleware, error_middleware, auth_middleware],
    )
    app[CONFIG_KEY] = config
    app[ENGINE_KEY] = engine
    app[STATE_KEY] = state
    app[METRICS_KEY] = ServerMetrics(engine, engine.model_name)
    app[TOKEN_TEXTS_KEY] = TokenTexts(engine.tokenizer)
    app.on_response_prepare.append(on_response_prepare)
    if config.server.cors_allow_origins:
        app.on_response_prepare.append(_cors_headers(config.server.cors_allow_origins))
        app.router.add_route("OPTIONS", "/{tail:.*}", _preflight)
    app.cleanup_ctx.append(_request_log_ctx)
    app.cleanup_ctx.append(_parse_pool_ctx)
    app.cleanup_ctx.append(_engine_ctx)
    routes_openai.add_routes(app)
    routes_responses.add_routes(app)  # [apps] /v1/responses
    routes_tokens.add_routes(app)  # [apps] /tokenize, /detokenize, /version
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    return app


async def _request_log_ctx(app: web.Application) -> AsyncIterator[None]:
    app[REQUEST_LOG_KEY] = RequestLog(app[CONFIG_KEY].logging)
    yield
    app[REQUEST_LOG_KEY].close()


async def _parse_pool_ctx(app: web.Application) -> AsyncIterator[None]:
    # NOTE: a burst of long prompts (256 x 2k tokens) tokenized on the event loop held it for
    # 256 x 3-10 ms: no first token went out until the last request was tokenized. Here they are
    # tokenized side by side (the Rust tokenizer releases the GIL) while the loop streams.
    app[PARSE_POOL_KEY] = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1),
                                             thread_name_prefix="parse")
    yield
    app[PARSE_POOL_KEY].shutdown(wait=False, cancel_futures=True)


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    engine = app[ENGINE_KEY]
    started_here = not engine.started
    if started_here:
        await engine.start()
    yield
    if started_here:
        await engine.shutdown()


async def _preflight(request: web.Request) -> web.Response:
    """CORS preflight (only routed when CORS is on): no key needed, the origin check is in _cors_headers."""
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-Id",
        "Access-Control-Max-Age": "600",
    })


def _cors_headers(origins: tuple[str, ...]):  # type: ignore[no-untyped-def]
    allowed = set(origins)

    async def add(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and ("*" in allowed or origin in allowed):
            response.headers["Access-Control-Allow-Origin"] = origin if "*" not in allowed else "*"
            response.headers["Vary"] = "Origin"

    return add


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app` on host:port (0: an ephemeral port). Returns the runner and the bound port.

    NOTE: handler_cancellation makes a client disconnect cancel its handler, which is what
    aborts a non-streaming request's generation (streams also notice on their next write).
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])
