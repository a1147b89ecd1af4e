"""The request pipeline around every handler: request id + request log, errors, auth.

Order (outermost first): `request_middleware` gives the request its id and record and writes
the request log line when it ends; `error_middleware` (the ONE place errors become responses)
maps ApplianceError subclasses and aiohttp HTTP errors to OpenAI-shaped JSON
`{"error": {"message", "type", "param", "code"}}`; `auth_middleware` identifies the client.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from appliance.errors import ApplianceError
from appliance.server.context import (
    CLIENT,
    CONFIG_KEY,
    METRICS_KEY,
    RECORD,
    REQUEST_ID,
    REQUEST_LOG_KEY,
    STATE_KEY,
)
from appliance.server.quotas import retry_after_header
from appliance.server.request_log import RequestRecord

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    503: ("service_unavailable", "service_unavailable"),
}
_MAX_REQUEST_ID_LEN = 128
_UNLOGGED_PATHS = {"/health", "/metrics"}  # polled every few seconds: not worth a log line each


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, the OpenAI `error` object, extra headers) for any exception."""
    headers: dict[str, str] = {}
    if isinstance(exc, ApplianceError):
        status = exc.http_status
        error = {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": exc.code}
        retry_after_s = getattr(exc, "retry_after_s", None)
        if retry_after_s is None and status in (429, 503):
            retry_after_s = 1.0
        if retry_after_s is not None:
            headers["Retry-After"] = retry_after_header(retry_after_s)
    elif isinstance(exc, web.HTTPException):
        status = exc.status
        error_type, code = _HTTP_ERROR_TYPES.get(status, ("invalid_request_error" if status < 500
                                                          else "internal_error", None))
        message = exc.text if exc.text and not exc.text.startswith(f"{status}:") else exc.reason
        if status == 404:
            message = "Not found: no such route"
        elif status == 413:
            message = f"Request body too large: {exc.text or exc.reason}"
        error = {"message": message, "type": error_type, "param": None, "code": code}
        if status == 405:
            allow = exc.headers.get("Allow")
            if allow:
                headers["Allow"] = allow
    else:
        status = 500
        error = {"message": "Internal server error", "type": "internal_error", "param": None, "code": None}
    return status, error, headers


@web.middleware
async def request_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get("x-request-id", "")
    request_id = incoming if 0 < len(incoming) <= _MAX_REQUEST_ID_LEN and incoming.isprintable() else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    record = RequestRecord(request_id=request_id, route=request.path, method=request.method)
    request[RECORD] = record
    response: web.StreamResponse | None = None
    try:
        response = await handler(request)
        return response
    finally:
        if response is not None and record.status == 0:
            record.status = response.status
        elif record.status == 0:
            record.status = 499  # the client went away before any response (nginx's convention)
        _account(request, record)


def _account(request: web.Request, record: RequestRecord) -> None:
    if request.path in _UNLOGGED_PATHS:
        return
    app = request.app
    metrics = app[METRICS_KEY]
    client = record.client or "unknown"
    metrics.client_requests.labels(client, str(record.status)).inc()
    if record.status == 429:
        metrics.client_rejections.labels(client, record.error_code or "rate_limit_exceeded").inc()
    try:
        app[REQUEST_LOG_KEY].write(record)
    except OSError:
        logger.exception("cannot write the request log")


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like are not errors
            raise
        return _error_response(request, exc)
    except ApplianceError as exc:
        if exc.http_status >= 500:
            logger.error("request %s failed: %s: %s", request.get(REQUEST_ID), type(exc).__name__, exc.message)
        return _error_response(request, exc)
    except Exception as exc:
        logger.exception("request %s failed", request.get(REQUEST_ID))
        return _error_response(request, exc)


def _error_response(request: web.Request, exc: BaseException) -> web.Response:
    status, error, headers = error_payload(exc)
    record: RequestRecord | None = request.get(RECORD)
    if record is not None:
        record.status = status
        record.error_type = error["type"]
        record.error_code = error["code"]
    return web.Response(status=status, text=json.dumps({"error": error}), content_type="application/json",
                        headers=headers)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    state = request.app[STATE_KEY]
    needs_key = (path != "/health" and request.method != "OPTIONS"  # CORS preflights carry no key
                 and (path != "/metrics" or request.app[CONFIG_KEY].server.metrics_require_auth))
    if needs_key or not state.keyring.open:
        try:
            client = state.keyring.identify(request.headers.get("Authorization"))
        except ApplianceError:
            if needs_key:
                raise
            client = "unknown"
    else:
        client = "anonymous"
    request[CLIENT] = client
    record: RequestRecord = request[RECORD]
    record.client = client
    return await handler(request)


async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
    """Every response, streamed ones and errors included, carries x-request-id."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["x-request-id"] = request_id
