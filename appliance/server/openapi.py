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
    "skip_special_tokens": {"type": "boolean", "default": True},
    "include_stop_str_in_output": {"type": "boolean", "default": False},
    "logit_bias": {"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                   "description": "token id (as a string) -> bias added to its logit; at most 300 entries"},
    "response_format": {"oneOf": [
        {"type": "object", "properties": {"type": {"enum": ["text", "json_object"]}}, "required": ["type"]},
        {"type": "object", "required": ["type", "json_schema"], "properties": {
            "type": {"const": "json_schema"},
            "json_schema": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string"}, "description": {"type": "string"}, "strict": {"type": ["boolean", "null"]},
                "schema": {"type": "object", "description": "JSON schema; keywords the grammar cannot enforce "
                           "(not, if/then/else, uniqueItems, ...) are a 400 naming them"}}}}}]},
    "structured_outputs": {"type": "object", "description": "vLLM extension: exactly one of these",
                           "properties": {"json": {"type": ["object", "string"]}, "regex": {"type": "string"},
                                          "choice": {"type": "array", "items": {"type": "string"}},
                                          "grammar": {"type": "string", "description": "EBNF (xgrammar/GBNF)"},
                                          "json_object": {"const": True}}},
    "store": {"const": False, "description": "nothing is stored"},
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
}

_FUNCTION = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "description": {"type": "string"}, "parameters": {"type": "object"},
    "strict": {"type": ["boolean", "null"]}}}
_TOOLS = {
    "tools": {"type": "array", "items": {"type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"}, "function": _FUNCTION}}},
    "tool_choice": {"oneOf": [{"enum": ["auto", "none", "required"]}, {"type": "object", "properties": {
        "type": {"const": "function"}, "function": {"type": "object", "properties": {"name": {"type": "string"}}}}}],
        "description": "required and a named function are enforced by a grammar"},
    "parallel_tool_calls": {"type": "boolean", "default": True},
}

_CHAT_REQUEST = {"type": "object", "required": ["messages"], "properties": {
    "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"],
                 "properties": {"role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                                "content": {"oneOf": [{"type": "string"}, {"type": "array"}, {"type": "null"}]},
                                "tool_calls": {"type": "array"}, "tool_call_id": {"type": "string"}}}},
    **_TOOLS,
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
    "suffix": {"type": "null", "description": "not supported: a non-empty suffix is a 400"},
    **_SAMPLING,
    "max_tokens": {"type": ["integer", "null"], "minimum": 0, "default": 16,
                   "description": "0 with echo (not streamed): score the prompt, generate nothing"}}}


_RESPONSES_REQUEST = {"type": "object", "required": ["input"], "properties": {
    "model": {"type": "string"},
    "input": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "object", "description":
              "a message {role, content}, a function_call {call_id, name, arguments} or a function_call_output "
              "{call_id, output}"}}]},
    "instructions": {"type": "string"}, "max_output_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number"}, "top_p": {"type": "number"}, "seed": {"type": "integer"},
    "tools": {"type": "array", "items": {**_FUNCTION, "properties": {**_FUNCTION["properties"],
                                                                   "type": {"const": "function"}}}},
    "tool_choice": {"oneOf": [{"enum": ["auto", "none", "required"]}, {"type": "object", "properties": {
        "type": {"const": "function"}, "name": {"type": "string"}}}]},
    "parallel_tool_calls": {"type": "boolean"},
    "text": {"type": "object", "properties": {"format": {"type": "object", "description":
             "{type: text | json_object | json_schema, name, schema, strict}"}, "verbosity": {"type": "string"}}},
    "stream": {"type": "boolean"}, "store": {"const": False}, "metadata": {"type": "object"},
    "user": {"type": "string"}, "truncation": {"const": "disabled"}}}

_TOKENIZE_REQUEST = {"type": "object", "properties": {
    "model": {"type": "string"}, "prompt": {"type": "string"}, "messages": _CHAT_REQUEST["properties"]["messages"],
    "tools": _TOOLS["tools"], "add_special_tokens": {"type": "boolean", "default": True},
    "add_generation_prompt": {"const": True}, "return_token_strs": {"type": "boolean", "default": False}}}
_DETOKENIZE_REQUEST = {"type": "object", "required": ["tokens"], "properties": {
    "model": {"type": "string"}, "tokens": {"type": "array", "items": {"type": "integer"}}}}


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
            "/v1/responses": _post("Responses API (text and function tools)", _RESPONSES_REQUEST, "response"),
            "/tokenize": _post("Token ids of a prompt or a chat (vLLM)", _TOKENIZE_REQUEST, "tokenize"),
            "/detokenize": _post("Text of token ids (vLLM)", _DETOKENIZE_REQUEST, "detokenize"),
            "/version": {"get": {"summary": "Server version", "responses": {"200": {"description": "version"}}}},
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
