"""Typed keys for what the app and each request carry (aiohttp `AppKey` and request-dict keys)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from appliance.config import AppConfig
from appliance.engine.async_engine import AsyncEngine
from appliance.server.metrics import ServerMetrics
from appliance.server.request_log import RequestLog, RequestRecord
from appliance.server.responses import TokenTexts
from appliance.server.state import ServiceState

CONFIG_KEY = web.AppKey("config", AppConfig)
ENGINE_KEY = web.AppKey("engine", AsyncEngine)
STATE_KEY = web.AppKey("state", ServiceState)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
REQUEST_LOG_KEY = web.AppKey("request_log", RequestLog)
TOKEN_TEXTS_KEY = web.AppKey("token_texts", TokenTexts)
# Threads that parse and tokenize long request bodies off the event loop (routes_openai._parse).
PARSE_POOL_KEY = web.AppKey("parse_pool", ThreadPoolExecutor)

# Request-dict keys (set by the middlewares). aiohttp >= 3.13 has typed RequestKeys; older
# releases (the GPU machine's) take plain strings.
_RequestKey: Any = getattr(web, "RequestKey", None)
if _RequestKey is not None:
    REQUEST_ID: Any = _RequestKey("request_id", str)
    RECORD: Any = _RequestKey("record", RequestRecord)  # the RequestRecord written to the request log
    CLIENT: Any = _RequestKey("client", str)  # the client name from the API key ("anonymous" when open)
else:
    REQUEST_ID = "appliance.request_id"
    RECORD = "appliance.record"
    CLIENT = "appliance.client"
