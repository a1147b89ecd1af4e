"""One streamed request through the real OpenAI API (aiohttp), timed chunk by chunk.

A chunk counts as output when it has a choice carrying text (completions: `text`, chat: any
`delta` field other than the role) or a finish reason; vLLM's client also counts completions
chunks whose text is empty (a token that decodes to no text yet), and so does this one. The
usage chunk and `[DONE]` carry no token. Output tokens come from the server's usage when it sends
one (`stream_options.include_usage`), else from the local tokenizer, else one per chunk.

Failures are kept by kind, with the server's message: `http_<status>`, `stream_error` (an error
event after the 200), `no_output` (the stream ended with no output chunk), `bad_stream`
(unparseable SSE), `timeout`, `connection`.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from appliance.benchserve.record import RequestRecord
from appliance.benchserve.workload import BenchRequest

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    model: str
    endpoint: str = "completions"  # or "chat"
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float | None = None  # None: the server's default (what vLLM's client sends)
    extra_body: dict[str, Any] | None = None
    request_timeout_s: float = 6 * 3600.0

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINTS[self.endpoint]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def build_payload(config: ClientConfig, request: BenchRequest) -> dict[str, Any]:
    body: dict[str, Any] = {"model": config.model, "max_tokens": request.max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}}
    if config.endpoint == "chat":
        body["messages"] = request.chat_messages()
    else:
        if request.prompt is None:
            raise ValueError("a chat workload (conversations) needs --endpoint chat")
        body["prompt"] = request.prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.temperature is not None:
        body["temperature"] = config.temperature
    if config.extra_body:
        body.update(config.extra_body)
    return body


class _SSEBuffer:
    """Splits a byte stream into SSE `data:` payloads (events end with a blank line)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._text = ""

    def feed(self, data: bytes) -> list[str]:
        self._text += self._decoder.decode(data).replace("\r\n", "\n")
        events = []
        while "\n\n" in self._text:
            event, self._text = self._text.split("\n\n", 1)
            lines = [ln[5:].lstrip() for ln in event.split("\n") if ln.startswith("data:")]
            if lines:  # comments (":ping") and other fields carry nothing for us
                events.append("\n".join(lines))
        return events

    def rest(self) -> list[str]:
        """An unterminated last event (some servers end without the blank line)."""
        tail = self._text.strip()
        self._text = ""
        return [tail[5:].lstrip()] if tail.startswith("data:") else []


def _carries_output(choice: dict[str, Any], endpoint: str) -> bool:
    if choice.get("finish_reason") is not None:
        return True
    if endpoint == "completions":
        return "text" in choice
    delta = choice.get("delta") or {}
    return any(v not in (None, "", []) for k, v in delta.items() if k != "role")


def _choice_text(choice: dict[str, Any], endpoint: str) -> str:
    if endpoint == "completions":
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


def _error_message(body: bytes) -> str:
    text = body.decode(errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return text.strip()[:300]
    if isinstance(parsed, dict):
        err = parsed.get("error", parsed)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
    return text.strip()[:300]


async def send(session: aiohttp.ClientSession, config: ClientConfig, request: BenchRequest, due_s: float,
               count_tokens: Callable[[str], int] | None = None) -> RequestRecord:
    """Send one request and time it; never raises for a failed request (the record says why)."""
    # The client's own prompt count holds for a completions prompt only (a chat template adds
    # tokens): without the server's usage a chat request's input stays 0, not a wrong figure.
    record = RequestRecord(index=request.index, due_s=due_s,
                           prompt_tokens=request.prompt_len if config.endpoint == "completions" else 0)
    payload = build_payload(config, request)
    text_parts: list[str] = []
    record.start_s = time.perf_counter()
    try:
        async with session.post(config.url, json=payload, headers=config.headers(),
                                timeout=aiohttp.ClientTimeout(total=config.request_timeout_s)) as response:
            if response.status != 200:
                record.error_kind = f"http_{response.status}"
                record.error_message = _error_message(await response.read())
                return record
            sse = _SSEBuffer()
            # NOTE: read to the end of the body, not just to the finish reason: the usage chunk
            # (the server's token count) comes after it.
            async for data in response.content.iter_any():
                now = time.perf_counter()
                for event in sse.feed(data):
                    consume_event(event, now, record, text_parts, config.endpoint)
                    if record.error_kind is not None:
                        return record
            for event in sse.rest():
                consume_event(event, time.perf_counter(), record, text_parts, config.endpoint)
    except TimeoutError:
        record.error_kind, record.error_message = "timeout", f"no answer within {config.request_timeout_s:g} s"
        return record
    except aiohttp.ClientError as exc:
        record.error_kind, record.error_message = "connection", f"{type(exc).__name__}: {exc}"[:300]
        return record
    except asyncio.CancelledError:
        raise
    finish_record(record, text_parts, count_tokens)
    return record


def finish_record(record: RequestRecord, text_parts: list[str],
                  count_tokens: Callable[[str], int] | None = None) -> None:
    """After the stream's end: a stream without an output chunk failed; output tokens are the
    server's usage, else the local tokenizer's count of the text, else one per chunk."""
    if record.error_kind is not None:
        return
    if not record.token_times_s:
        record.error_kind, record.error_message = "no_output", "the stream ended without an output chunk"
        return
    if record.output_tokens_source != "usage":
        text = "".join(text_parts)
        if count_tokens is not None:
            record.output_tokens, record.output_tokens_source = count_tokens(text), "tokenizer"
        else:
            record.output_tokens, record.output_tokens_source = len(record.token_times_s), "chunks"


def consume_event(event: str, now: float, record: RequestRecord, text_parts: list[str], endpoint: str) -> None:
    """Apply one SSE payload, read at `now`, to the record."""
    if event == "[DONE]":
        return
    try:
        chunk = json.loads(event)
    except ValueError:
        record.error_kind, record.error_message = "bad_stream", f"not JSON: {event[:200]!r}"
        return
    if not isinstance(chunk, dict):
        record.error_kind, record.error_message = "bad_stream", f"not an object: {event[:200]!r}"
        return
    if "error" in chunk and chunk["error"]:
        err = chunk["error"]
        record.error_kind = "stream_error"
        record.error_message = str(err.get("message", err) if isinstance(err, dict) else err)[:300]
        return
    choices = chunk.get("choices") or []
    if choices and any(_carries_output(c, endpoint) for c in choices):
        record.token_times_s.append(now)
        for c in choices:
            text_parts.append(_choice_text(c, endpoint))
            if c.get("finish_reason") is not None:
                record.finish_reason = c["finish_reason"]
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            record.output_tokens, record.output_tokens_source = usage["completion_tokens"], "usage"
        if isinstance(usage.get("prompt_tokens"), int):
            record.prompt_tokens = usage["prompt_tokens"]
