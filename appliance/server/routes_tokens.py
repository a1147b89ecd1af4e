"""vLLM's utility routes: POST /tokenize, POST /detokenize, GET /version (same shapes as vLLM)."""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web

from appliance import __version__
from appliance.errors import InvalidRequestError
from appliance.server import schema
from appliance.server import tools as tool_calls
from appliance.server.context import CONFIG_KEY, ENGINE_KEY


async def _body(request: web.Request, known: frozenset[str]) -> dict[str, Any]:
    from appliance.server.routes_openai import _read_json

    body = await _read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    schema.check_fields(body, known)
    schema.check_model(body, request.app[ENGINE_KEY].model_name)
    return body


_TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                              "return_token_strs", "tools"})


async def tokenize(request: web.Request) -> web.Response:
    """{prompt | messages, add_special_tokens, return_token_strs} -> {count, max_model_len, tokens, token_strs}."""
    body = await _body(request, _TOKENIZE_FIELDS)
    engine = request.app[ENGINE_KEY]
    tokenizer = engine.tokenizer
    want_strs = body.get("return_token_strs", False)
    if not isinstance(want_strs, bool):
        raise InvalidRequestError("'return_token_strs' must be a boolean", param="return_token_strs")
    if "messages" in body:
        if body.get("add_generation_prompt", True) is not True:
            raise InvalidRequestError("'add_generation_prompt' false is not supported", param="add_generation_prompt")
        config = tool_calls.parse_tools(body, getattr(tokenizer, "chat_template", None),
                                        request.app[CONFIG_KEY].server.tool_call_parser)
        messages, tools = tool_calls.template_messages(schema.chat_messages(body), config)
        render = functools.partial(engine.render_chat, no_template_hint="tokenize a 'prompt' instead")
        ids = render(messages, tools=tools)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise InvalidRequestError("'prompt' must be a string (or send 'messages')", param="prompt")
        special = body.get("add_special_tokens", True)
        if not isinstance(special, bool):
            raise InvalidRequestError("'add_special_tokens' must be a boolean", param="add_special_tokens")
        ids = list(tokenizer.encode(prompt, add_special_tokens=special))
    return web.json_response({
        "count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids) if want_strs else None})


async def detokenize(request: web.Request) -> web.Response:
    body = await _body(request, frozenset({"model", "tokens"}))
    engine = request.app[ENGINE_KEY]
    tokens = body.get("tokens")
    vocab = len(engine.tokenizer)
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                               for t in tokens):
        raise InvalidRequestError(f"'tokens' must be a list of token ids in [0, {vocab})", param="tokens")
    return web.json_response({"prompt": engine.tokenizer.decode(tokens)})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": __version__})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/version", version)
