"""Typed keys for what the app and each request carry (aiohttp `AppKey` and request-dict keys)."""

from __future__ import annotations

from aiohttp import web

from appliance.config import AppConfig
from appliance.engine.async_engine import AsyncEngine
from appliance.server.metrics import ServerMetrics
from appliance.server.request_log import RequestLog
from appliance.server.responses import TokenTexts
from appliance.server.state import ServiceState

CONFIG_KEY = web.AppKey("config", AppConfig)
ENGINE_KEY = web.AppKey("engine", AsyncEngine)
STATE_KEY = web.AppKey("state", ServiceState)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)
REQUEST_LOG_KEY = web.AppKey("request_log", RequestLog)
TOKEN_TEXTS_KEY = web.AppKey("token_texts", TokenTexts)

# Request-dict keys (set by the middlewares).
REQUEST_ID = "appliance.request_id"
RECORD = "appliance.record"  # the RequestRecord written to the request log
CLIENT = "appliance.client"  # the client name from the API key ("anonymous" when open)
