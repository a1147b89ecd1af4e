"""OpenAI routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models[/{model}].

A request goes: parse + tokenize (schema.py) → admit (state.py: phase, quotas, queue) → one
engine request per prompt (AsyncEngine.generate, merged) → SSE (streaming.py) or one JSON body.
Closing the merged stream (client gone, handler cancelled) aborts every engine request.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from aiohttp import web

from appliance.engine.async_engine import AsyncEngine
from appliance.engine.outputs import RequestDelta
from appliance.engine.sequence import SamplingParams
from appliance.errors import InvalidRequestError
from appliance.server import schema
from appliance.server import tools as tool_calls
from appliance.server.context import (
    CLIENT,
    CONFIG_KEY,
    ENGINE_KEY,
    METRICS_KEY,
    PARSE_POOL_KEY,
    RECORD,
    REQUEST_LOG_KEY,
    STATE_KEY,
    TOKEN_TEXTS_KEY,
)
from appliance.server.metrics import RequestUsage
from appliance.server.middleware import error_payload
from appliance.server.request_log import RequestRecord
from appliance.server.responses import ChoiceTracker, chat_logprobs, completion_logprobs, now_s
from appliance.server.state import Admission
from appliance.server.streaming import ChatChunks, CompletionChunks, SSEWriter

# Tokenizing a prompt costs ~1.5 us per character (3-10 ms for 2k tokens): past this many bytes
# of body it runs on the app's parse threads, side by side and off the event loop, which keeps
# streaming meanwhile. Shorter bodies (a chat turn, a one-at-a-time prompt of 256 tokens) parse
# inline: a thread hand-off would cost more than it saves.
_OFFLOAD_BODY_BYTES = 2048


async def _merged(
    engine: AsyncEngine, request_ids: list[str], prompts: list[list[int]], params: SamplingParams, stream: bool
) -> AsyncIterator[tuple[int, RequestDelta]]:
    """(prompt index, delta) from one engine request per prompt."""
    final_only = not stream
    if len(request_ids) == 1:
        async with aclosing(engine.generate(request_ids[0], prompts[0], params, final_only=final_only)) as outputs:
            async for output in outputs:
                yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestDelta | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int) -> None:
        try:
            async with aclosing(engine.generate(request_ids[index], prompts[index], params,
                                                final_only=final_only)) as outputs:
                async for output in outputs:
                    queue.put_nowait((index, output, None))
        except Exception as exc:  # handed to the consumer, which raises it
            queue.put_nowait((index, None, exc))
        queue.put_nowait((index, None, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(request_ids))]
    try:
        remaining = len(tasks)
        while remaining:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output is None:
                remaining -= 1
                continue
            yield index, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Run:
    """One HTTP request's generation: tracking, metrics and the request record, kind-agnostic."""

    def __init__(self, request: web.Request, parsed: schema.ParsedRequest, admission: Admission) -> None:
        self.app = request.app
        self.parsed = parsed
        self.admission = admission
        self.record: RequestRecord = request[RECORD]
        self.client: str = request[CLIENT]
        # A stream keeps no text unless the request log wants it.
        keep_text = not parsed.stream or request.app[REQUEST_LOG_KEY].log_text
        self.tracker = ChoiceTracker(len(parsed.prompts), parsed.params.n, [len(p) for p in parsed.prompts],
                                     keep_text=keep_text)

    def update(self, prompt_index: int, output: RequestDelta) -> list[Any]:
        deltas = self.tracker.update(prompt_index, output)
        new_tokens = sum(len(d.token_ids) for d in deltas)
        if new_tokens:
            now = time.monotonic()
            metrics = self.app[METRICS_KEY]
            tracker = self.tracker
            if tracker.first_token_monotonic is None:
                tracker.first_token_monotonic = now
                self.record.ttft_s = now - self.record.started_monotonic
            elif tracker.last_token_monotonic is not None:
                metrics.observe_inter_token((now - tracker.last_token_monotonic) / new_tokens, new_tokens)
            tracker.last_token_monotonic = now
            self.admission.progress(tracker.completion_tokens)
        return deltas

    def finish(self) -> None:
        tracker = self.tracker
        record = self.record
        metrics = self.app[METRICS_KEY]
        record.completion_tokens = tracker.completion_tokens
        record.finish_reasons = tracker.finish_reasons
        metrics.client_generation_tokens.labels(self.client).inc(tracker.completion_tokens)
        if self.app[REQUEST_LOG_KEY].log_text:
            record.output_text = [c.text for c in tracker.choices]
        if len(record.finish_reasons) == len(tracker.choices):
            queue_s = None
            metric = tracker.finished_metrics[0] if tracker.finished_metrics else None
            if metric is not None and metric.first_scheduled_time is not None:
                queue_s = max(metric.first_scheduled_time - metric.arrival_time, 0.0)
            params = self.parsed.params
            usage = RequestUsage(  # [apps] vLLM's per-request histograms
                prompt_tokens=self.parsed.num_prompt_tokens,
                generation_tokens=[c.num_tokens for c in tracker.choices], n=params.n, max_tokens=params.max_tokens,
                first_scheduled_s=None if metric is None else metric.first_scheduled_time,
                first_token_s=None if metric is None else metric.first_token_time,
                finished_s=None if metric is None else metric.finished_time)
            metrics.observe_finished(
                finish_reasons=record.finish_reasons, ttft_s=record.ttft_s,
                e2e_s=time.monotonic() - record.started_monotonic, queue_s=queue_s, usage=usage,
            )


# The end of the error a chat request gets when the model has no chat template.
NO_CHAT_TEMPLATE_HINT = "use /v1/completions"


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequestError("the request body is not valid JSON", code="invalid_json") from None
    except RecursionError:  # nesting deeper than the parser's recursion limit
        raise InvalidRequestError("the request body is nested too deeply", code="invalid_json") from None


async def _parse(request: web.Request, chat: bool) -> schema.ParsedRequest:
    body = await _read_json(request)
    engine = request.app[ENGINE_KEY]
    parse = schema.parse_chat if chat else schema.parse_completion
    kwargs: dict[str, Any] = dict(served_model_name=engine.model_name, max_model_len=engine.max_model_len,
                                  default_max_tokens=request.app[CONFIG_KEY].server.default_max_tokens)
    if chat:
        kwargs["render_chat"] = functools.partial(engine.render_chat, no_template_hint=NO_CHAT_TEMPLATE_HINT)
        kwargs["chat_template"] = getattr(engine.tokenizer, "chat_template", None)
        kwargs["vocab_size"] = len(engine.tokenizer)
        kwargs["tool_call_parser"] = request.app[CONFIG_KEY].server.tool_call_parser
    else:
        kwargs["tokenizer"] = engine.tokenizer
    if request.content_length is not None and request.content_length > _OFFLOAD_BODY_BYTES:
        parsed = await asyncio.get_running_loop().run_in_executor(
            request.app.get(PARSE_POOL_KEY), functools.partial(parse, body, **kwargs))
    else:
        parsed = parse(body, **kwargs)
    if request.app[REQUEST_LOG_KEY].log_text:
        request[RECORD].prompt_text = body.get("messages") if chat else body.get("prompt")
    return parsed


async def _handle(request: web.Request, chat: bool) -> web.StreamResponse:
    parsed = await _parse(request, chat)
    app = request.app
    engine = app[ENGINE_KEY]
    record: RequestRecord = request[RECORD]
    completion_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    record.completion_id = completion_id
    record.stream = parsed.stream
    record.prompt_tokens = parsed.num_prompt_tokens
    engine_ids = [completion_id] if len(parsed.prompts) == 1 else [
        f"{completion_id}-{i}" for i in range(len(parsed.prompts))]
    async with app[STATE_KEY].admit(
        request_id=completion_id, client=request[CLIENT], route=request.path,
        prompt_tokens=parsed.num_prompt_tokens, reserved_tokens=parsed.reserved_tokens(engine.max_model_len),
        engine_request_ids=engine_ids,
    ) as admission:
        app[METRICS_KEY].client_prompt_tokens.labels(request[CLIENT]).inc(parsed.num_prompt_tokens)
        run = _Run(request, parsed, admission)
        try:
            async with aclosing(_merged(engine, engine_ids, parsed.prompts, parsed.params, parsed.stream)) as outputs:
                if parsed.stream:
                    return await _stream(request, run, outputs, completion_id, chat, engine_ids)
                async for prompt_index, output in outputs:
                    run.update(prompt_index, output)
        finally:
            run.finish()
        body = _chat_body(request, run, completion_id) if chat else _completion_body(request, run, completion_id)
        return web.json_response(body, dumps=lambda o: json.dumps(o, ensure_ascii=False))


async def _stream(
    request: web.Request, run: _Run, outputs: AsyncIterator[tuple[int, RequestDelta]], completion_id: str,
    chat: bool, engine_ids: list[str],
) -> web.StreamResponse:
    parsed = run.parsed
    texts = request.app[TOKEN_TEXTS_KEY]
    model = parsed.model
    created = now_s()
    builder: ChatChunks | CompletionChunks
    if chat:
        builder = ChatChunks(completion_id, model, created, texts, logprobs=parsed.logprobs,
                             include_usage=parsed.include_usage, tools=parsed.tools)
    else:
        builder = CompletionChunks(completion_id, model, created, texts, logprobs=parsed.logprobs,
                                   include_usage=parsed.include_usage, echo_texts=_echo_texts(request, parsed),
                                   echo_ids=parsed.prompts if parsed.echo else None, n=parsed.params.n,
                                   prompt_logprobs=run.tracker.prompt_logprobs)
    # The first output comes before the 200, so a request the engine rejects gets a 4xx.
    item = await anext(outputs, None)
    writer = SSEWriter(request)
    await writer.open()
    busy = True  # this task holds an item: the engine's callback must not write past it

    def push(delta: RequestDelta) -> bool:
        # Called inside the step's delivery (AsyncEngine.set_push): one event, no task switch.
        if busy or not writer.writable():
            return False
        writer.write_nowait(builder.chunks(run.update(0, delta)))
        return True

    if len(engine_ids) == 1:  # one prompt: its deltas can be pushed (several: the merge's tasks)
        request.app[ENGINE_KEY].set_push(engine_ids[0], push)
    try:
        while item is not None:
            busy = True
            await writer.send(builder.chunks(run.update(*item)))
            busy = False
            item = await anext(outputs, None)
        if parsed.include_usage:
            await writer.send([builder.usage_chunk(run.tracker.usage())])
        await writer.done()
    except (ConnectionError, asyncio.CancelledError):
        raise  # the client went away: closing `outputs` aborts the engine requests
    except Exception as exc:  # after the 200: an error event, as the SDK expects
        status, error, _headers = error_payload(exc)
        run.record.error_type = error["type"]
        run.record.error_code = error["code"]
        run.record.status = status
        await writer.send_error(error)
    return writer.response


def _echo_texts(request: web.Request, parsed: schema.ParsedRequest) -> list[str] | None:
    if not parsed.echo:
        return None
    tokenizer = request.app[ENGINE_KEY].tokenizer
    return [text if text is not None else tokenizer.decode(ids)
            for text, ids in zip(parsed.prompt_texts, parsed.prompts, strict=True)]


def _chat_body(request: web.Request, run: _Run, completion_id: str) -> dict[str, Any]:
    texts = request.app[TOKEN_TEXTS_KEY]
    choices = []
    for index, choice in enumerate(run.tracker.choices):
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        finish_reason = choice.finish_reason
        if run.parsed.tools is not None:
            content, calls = tool_calls.extract_calls(run.parsed.tools, choice.text)
            if calls:
                message = {"role": "assistant", "content": content, "refusal": None,
                           "tool_calls": tool_calls.call_dicts(calls)}
                finish_reason = "tool_calls"
        choices.append({
            "index": index,
            "message": message,
            "logprobs": chat_logprobs(texts, choice.logprobs) if run.parsed.logprobs else None,
            "finish_reason": finish_reason,
        })
    return {"id": completion_id, "object": "chat.completion", "created": now_s(), "model": run.parsed.model,
            "system_fingerprint": None, "choices": choices, "usage": run.tracker.usage()}


def _completion_body(request: web.Request, run: _Run, completion_id: str) -> dict[str, Any]:
    texts = request.app[TOKEN_TEXTS_KEY]
    parsed = run.parsed
    echo_texts = _echo_texts(request, parsed)
    choices = []
    for index, choice in enumerate(run.tracker.choices):
        prompt_index = index // parsed.params.n
        prefix = echo_texts[prompt_index] if echo_texts is not None else ""
        # max_tokens 0: the prompt only (the engine's one sampled token is not part of the answer)
        generated, generated_logprobs = ("", []) if parsed.score_only else (choice.text, choice.logprobs)
        logprobs = None
        if parsed.logprobs:
            logprobs = completion_logprobs(texts, generated_logprobs, text_offset_start=0,
                                           echo_prompt_ids=parsed.prompts[prompt_index] if parsed.echo else None,
                                           prompt_logprobs=run.tracker.prompt_logprobs.get(prompt_index))
        choices.append({"index": index, "text": prefix + generated, "logprobs": logprobs,
                        "finish_reason": "length" if parsed.score_only else choice.finish_reason})
    usage = run.tracker.usage()
    if parsed.score_only:
        usage = {**usage, "completion_tokens": 0, "total_tokens": usage["prompt_tokens"]}
    return {"id": completion_id, "object": "text_completion", "created": now_s(), "model": parsed.model,
            "system_fingerprint": None, "choices": choices, "usage": usage}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _handle(request, chat=False)


def _model_card(engine: AsyncEngine, created: int) -> dict[str, Any]:
    return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "llm-appliance",
            "max_model_len": engine.max_model_len}


async def list_models(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    created = int(time.time() - (time.monotonic() - request.app[STATE_KEY].started_monotonic))
    return web.json_response({"object": "list", "data": [_model_card(engine, created)]})


async def get_model(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    name = request.match_info["model"]
    schema.check_model({"model": name}, engine.model_name)
    created = int(time.time() - (time.monotonic() - request.app[STATE_KEY].started_monotonic))
    return web.json_response(_model_card(engine, created))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
