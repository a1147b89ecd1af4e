"""The OpenAPI 3.1 document of the HTTP API, served at GET /openapi.json.

Written by hand (small, and it states what we accept, not what OpenAI accepts): the request
schemas list the parameters schema.py reads; responses point to OpenAI's shapes by name.
"""

from __future__ import annotations

from typing import Any

from appliance import __version__

_ERROR = {"type": "object", "properties": {"error": {"type": "object", "properties": {
    "message": {"type": "string"}, "type": {"type": "string"},
    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}

_SAMPLING: dict[str, Any] = {
    "model": {"type": "string"},
    "n": {"type": "integer", "minimum": 1, "maximum": 128, "default": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 100, "default": 1},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1},
    "top_k": {"type": "integer", "default": 0, "description": "0 or -1: off (extension)"},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1, "default": 0},
    "seed": {"type": ["integer", "null"]},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]},
    "stop_token_ids": {"type": "array", "items": {"type": "integer"}},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
    "min_tokens": {"type": "integer", "minimum": 0},
    "ignore_eos": {"type": "boolean"},
    "stream": {"type": "boolean", "default": False},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "user": {"type": "string"},
}

_CHAT_REQUEST = {"type": "object", "required": ["messages"], "properties": {
    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role", "content"],
                 "properties": {"role": {"enum": ["system", "developer", "user", "assistant"]},
                                "content": {"oneOf": [{"type": "string"}, {"type": "array"}]}}}},
    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
    "logprobs": {"type": "boolean"},
    "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
    **_SAMPLING}}

_COMPLETION_REQUEST = {"type": "object", "required": ["prompt"], "properties": {
    "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                         {"type": "array", "items": {"type": "integer"}},
                         {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]},
    "echo": {"type": "boolean"},
    "logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": 20},
    "best_of": {"type": "integer", "description": "must equal n"},
    **_SAMPLING}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "error", "content": {"application/json": {"schema": _ERROR}}} for c in codes}


def _post(summary: str, request_schema: dict[str, Any], response_name: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
        "responses": {
            "200": {"description": f"an OpenAI `{response_name}` object, or with stream=true an SSE stream",
                    "content": {"application/json": {}, "text/event-stream": {}}},
            **_errors(400, 401, 404, 413, 429, 500, 503)},
    }}


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "llm-appliance OpenAI-compatible API", "version": __version__},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": _post("Chat completion", _CHAT_REQUEST, "chat.completion"),
            "/v1/completions": _post("Text completion", _COMPLETION_REQUEST, "text_completion"),
            "/v1/models": {"get": {"summary": "The served model", "responses": {"200": {"description": "list"}}}},
            "/v1/models/{model}": {"get": {"summary": "One model", "parameters": [
                {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "model"}, **_errors(404)}}},
            "/health": {"get": {"summary": "200 while ready and the engine loop makes progress", "security": [],
                                "responses": {"200": {"description": "healthy"}, **_errors(503)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (vLLM names)",
                                 "responses": {"200": {"description": "text exposition format"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "ok"}}}},
        },
    }
