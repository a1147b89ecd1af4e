"""POST /v1/responses: OpenAI's Responses API for text and function tools, streamed or not.

A request is translated into a chat request (input items -> messages, `instructions` -> a system
message, flat function tools -> chat tools, `text.format` -> response_format) and parsed by the
same code as /v1/chat/completions, so every check and 400 is shared. The answer is a `response`
object whose output holds a `message` item (output_text) and/or `function_call` items; streamed,
the events are response.created / in_progress, output_item.added, content_part.added,
output_text.delta / done, content_part.done, function_call_arguments.delta / done,
output_item.done and response.completed, each with its sequence_number.
Nothing is stored: `store` must be false or absent and `previous_response_id` is refused.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from contextlib import aclosing
from typing import Any

from aiohttp import web

from appliance.errors import InvalidRequestError
from appliance.server import schema
from appliance.server import tools as tool_calls
from appliance.server.context import CLIENT, CONFIG_KEY, ENGINE_KEY, METRICS_KEY, RECORD, STATE_KEY
from appliance.server.routes_openai import NO_CHAT_TEMPLATE_HINT, _merged, _read_json, _Run

_FIELDS = frozenset({"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "tools",
                     "tool_choice", "parallel_tool_calls", "text", "stream", "store", "metadata", "user", "seed",
                     "truncation"})


def _bad(param: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}' {message}", param=param)


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text") \
                    or not isinstance(part.get("text"), str):
                raise _bad(f"{param}[{i}]", "must be an input_text or output_text part")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(param, "must be a string or a list of text parts")


def to_chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body equivalent to a Responses request (400s name the Responses fields)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    if body.get("previous_response_id") is not None:
        raise _bad("previous_response_id", "is not supported: this server stores no responses (send the input)")
    if body.get("truncation") not in (None, "disabled"):
        raise _bad("truncation", "must be 'disabled'")
    schema.check_fields(body, _FIELDS)
    messages: list[dict[str, Any]] = []
    if body.get("instructions") is not None:
        messages.append({"role": "system", "content": _text_of(body["instructions"], "instructions")})
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("input", "must be a string or a non-empty list of items")
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text_of(item.get("content"), f"input[{i}].content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise _bad(f"input[{i}].type", f"must be 'message', 'function_call' or 'function_call_output', got {kind!r}")
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": body.get("stream"),
                            "max_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature"),
                            "top_p": body.get("top_p"), "user": body.get("user"), "seed": body.get("seed"),
                            "parallel_tool_calls": body.get("parallel_tool_calls"), "store": body.get("store")}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "must be a list of function tools")
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") != "function":
                raise _bad(f"tools[{i}].type", "must be 'function' (the only tool this server runs)")
            converted.append({"type": "function", "function": {k: tool[k] for k in (
                "name", "description", "parameters", "strict") if tool.get(k) is not None}})
        chat["tools"] = converted
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise _bad("tool_choice", "must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}")
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    chat["tool_choice"] = choice
    text = body.get("text")
    if text is not None:
        fmt = text.get("format") if isinstance(text, dict) else None
        if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
            raise _bad("text", "must be {'format': {...}}")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            chat["response_format"] = {"type": "json_schema", "json_schema": {
                k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
        elif fmt is not None:
            chat["response_format"] = fmt
    return {k: v for k, v in chat.items() if v is not None}


def _usage(run: _Run) -> dict[str, Any]:
    usage = run.tracker.usage()
    return {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


def _response(body: dict[str, Any], response_id: str, created: int, model: str, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None, incomplete: str | None) -> dict[str, Any]:
    text = body.get("text") or {"format": {"type": "text"}}
    return {"id": response_id, "object": "response", "created_at": created, "status": status, "model": model,
            "output": output, "error": None,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True), "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0), "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [], "text": text, "truncation": "disabled", "store": False,
            "metadata": body.get("metadata") or {}, "previous_response_id": None, "reasoning": None,
            "user": body.get("user"), "usage": usage}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status ==
            "completed" else []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


class _Events:
    """Builds the streamed events of one response (one choice)."""

    def __init__(self, writer: web.StreamResponse) -> None:
        self.writer = writer
        self.sequence_number = 0
        self.output: list[dict[str, Any]] = []
        self.message: tuple[int, str, list[str]] | None = None  # (output_index, item id, text pieces)
        self.calls: dict[int, tuple[int, str, str, str, list[str]]] = {}  # call index -> (out idx, id, call_id, name, args)

    async def send(self, kind: str, **fields: Any) -> None:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        await self.writer.write(f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode())

    async def content(self, delta: str) -> None:
        if self.message is None:
            index, item_id = len(self.output), "msg_" + uuid.uuid4().hex
            self.output.append({})
            self.message = (index, item_id, [])
            await self.send("response.output_item.added", output_index=index,
                            item=_message_item(item_id, "", "in_progress"))
            await self.send("response.content_part.added", item_id=item_id, output_index=index, content_index=0,
                            part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
        index, item_id, pieces = self.message
        pieces.append(delta)
        await self.send("response.output_text.delta", item_id=item_id, output_index=index, content_index=0,
                        delta=delta, logprobs=[])

    async def close_message(self) -> None:
        if self.message is None:
            return
        index, item_id, pieces = self.message
        text = "".join(pieces)
        await self.send("response.output_text.done", item_id=item_id, output_index=index, content_index=0,
                        text=text, logprobs=[])
        await self.send("response.content_part.done", item_id=item_id, output_index=index, content_index=0,
                        part={"type": "output_text", "text": text, "annotations": [], "logprobs": []})
        self.output[index] = _message_item(item_id, text)
        await self.send("response.output_item.done", output_index=index, item=self.output[index])
        self.message = None

    async def tool_call(self, delta: dict[str, Any]) -> None:
        k = delta["index"]
        if k not in self.calls:
            await self.close_message()
            index, item_id = len(self.output), "fc_" + uuid.uuid4().hex
            self.output.append({})
            name = delta["function"]["name"]
            self.calls[k] = (index, item_id, delta["id"], name, [])
            await self.send("response.output_item.added", output_index=index,
                            item=_call_item(item_id, delta["id"], name, "", "in_progress"))
        index, item_id, _, _, pieces = self.calls[k]
        arguments = delta["function"].get("arguments") or ""
        if arguments:
            pieces.append(arguments)
            await self.send("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                            delta=arguments)

    async def close_calls(self) -> None:
        for index, item_id, call_id, name, pieces in self.calls.values():
            arguments = "".join(pieces)
            await self.send("response.function_call_arguments.done", item_id=item_id, output_index=index,
                            name=name, arguments=arguments)
            self.output[index] = _call_item(item_id, call_id, name, arguments)
            await self.send("response.output_item.done", output_index=index, item=self.output[index])


async def create_response(request: web.Request) -> web.StreamResponse:
    body = await _read_json(request)
    chat_body = to_chat_body(body)
    app = request.app
    engine = app[ENGINE_KEY]
    parsed = schema.parse_chat(
        chat_body, render_chat=functools.partial(engine.render_chat, no_template_hint=NO_CHAT_TEMPLATE_HINT),
        served_model_name=engine.model_name, max_model_len=engine.max_model_len,
        default_max_tokens=app[CONFIG_KEY].server.default_max_tokens,
        chat_template=getattr(engine.tokenizer, "chat_template", None), vocab_size=len(engine.tokenizer),
        tool_call_parser=app[CONFIG_KEY].server.tool_call_parser)
    if parsed.params.n != 1:
        raise _bad("n", "must be 1")
    response_id = "resp_" + uuid.uuid4().hex
    created = int(time.time())
    record = request[RECORD]
    record.completion_id = response_id
    record.stream = parsed.stream
    record.prompt_tokens = parsed.num_prompt_tokens
    async with app[STATE_KEY].admit(
        request_id=response_id, client=request[CLIENT], route=request.path,
        prompt_tokens=parsed.num_prompt_tokens, reserved_tokens=parsed.reserved_tokens(engine.max_model_len),
        engine_request_ids=[response_id],
    ) as admission:
        app[METRICS_KEY].client_prompt_tokens.labels(request[CLIENT]).inc(parsed.num_prompt_tokens)
        run = _Run(request, parsed, admission)
        try:
            async with aclosing(_merged(engine, [response_id], parsed.prompts, parsed.params, parsed.stream)) as outputs:
                if parsed.stream:
                    return await _stream(request, body, run, outputs, response_id, created)
                async for prompt_index, output in outputs:
                    run.update(prompt_index, output)
        finally:
            run.finish()
    choice = run.tracker.choices[0]
    output: list[dict[str, Any]] = []
    content: str | None = choice.text
    calls: list[Any] = []
    if parsed.tools is not None:
        content, calls = tool_calls.extract_calls(parsed.tools, choice.text)
    if content:
        output.append(_message_item("msg_" + uuid.uuid4().hex, content))
    for call in tool_calls.call_dicts(calls):
        output.append(_call_item("fc_" + uuid.uuid4().hex, call["id"], call["function"]["name"],
                                 call["function"]["arguments"]))
    incomplete = "max_output_tokens" if choice.finish_reason == "length" and not calls else None
    return web.json_response(_response(body, response_id, created, parsed.model,
                                       "incomplete" if incomplete else "completed", output, _usage(run), incomplete),
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def _stream(request: web.Request, body: dict[str, Any], run: _Run, outputs: Any, response_id: str,
                  created: int) -> web.StreamResponse:
    parsed = run.parsed
    item = await anext(outputs, None)  # before the 200: an engine rejection is still a 4xx
    writer = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                     "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await writer.prepare(request)
    events = _Events(writer)
    shell = _response(body, response_id, created, parsed.model, "in_progress", [], None, None)
    await events.send("response.created", response=shell)
    await events.send("response.in_progress", response=shell)
    config = parsed.tools or tool_calls.ToolConfig([], "none", None, True, tool_calls.parser_for_template(None), False)
    stream = tool_calls.ToolStream(config)
    finish_reason = None
    while item is not None:
        for delta in run.update(*item):
            finish_reason = delta.finish_reason or finish_reason
            if parsed.tools is None:
                payloads = [{"content": delta.text}] if delta.text else []
            else:
                payloads = stream.feed(delta.text, delta.finish_reason is not None)
            for payload in payloads:
                if payload.get("content"):
                    await events.content(payload["content"])
                for call in payload.get("tool_calls") or []:
                    await events.tool_call(call)
        item = await anext(outputs, None)
    await events.close_message()
    await events.close_calls()
    incomplete = "max_output_tokens" if finish_reason == "length" and not events.calls else None
    final = _response(body, response_id, created, parsed.model, "incomplete" if incomplete else "completed",
                      events.output, _usage(run), incomplete)
    await events.send("response.incomplete" if incomplete else "response.completed", response=final)
    await writer.write_eof()
    return writer


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/responses", create_response)
