"""Server-sent events exactly as the OpenAI SDK parses them.

Each event is `data: <json>\n\n`; the stream ends with `data: [DONE]\n\n`. Chat chunks carry the
role in each choice's first delta and `finish_reason` in its last; with
`stream_options.include_usage` every chunk has `"usage": null` and a last chunk with no choices
carries the usage. An error after the 200 is sent as `data: {"error": {...}}`, which the SDK
raises as `openai.APIError`.

NOTE: all the chunks produced by one engine step go out in one write (from the engine's per-step
callback while the client keeps up: `SSEWriter.write_nowait`), and every engine step
that gave a choice new tokens makes an event, text or not (a partial character, a held-back stop
prefix): clients time tokens by events, as with vLLM. JSON is encoded by msgspec.
"""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from appliance.server.responses import ChoiceDelta, TokenTexts, chat_logprobs, completion_logprobs
from appliance.server.tools import ToolConfig, ToolStream

_DONE = b"data: [DONE]\n\n"


_encode = msgspec.json.Encoder().encode  # UTF-8 as is (ensure_ascii=False), compact


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + _encode(payload) + b"\n\n"


# Past this many bytes waiting in the socket's send buffer, a client is reading slower than
# tokens arrive: events stop being written from the engine's callback (`write_nowait`), the
# route's task takes over and waits for the buffer to drain, and the steps meanwhile merge.
_HIGH_WATER_BYTES = 64 * 1024


class SSEWriter:
    """One SSE response. `send` (awaited) goes through aiohttp and waits for a slow client;
    `write_nowait` (from the engine's per-step callback) writes one HTTP/1.1 chunk straight to the
    transport, which is what lets a step's events go out without waking each request's task.
    NOTE: the direct path starts once aiohttp has sent the headers (with the first event) and only
    on a chunked response (HTTP/1.1; HTTP/1.0 clients always take the awaited path)."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                     "X-Accel-Buffering": "no"},
        )
        self.prepared = False
        self._direct = False  # headers out, chunked: events may be written to the transport

    async def open(self) -> None:
        await self.response.prepare(self._request)
        self.prepared = True

    async def send(self, payloads: list[dict[str, Any]]) -> None:
        if not payloads:
            return
        data = b"".join(_event(p) for p in payloads)
        if self._direct:
            self._write_chunk(data)
            await self._request.writer.drain()  # returns at once unless the client is behind
            return
        await self.response.write(data)
        self._direct = bool(getattr(self._request.writer, "chunked", False))

    def writable(self) -> bool:
        """True when `write_nowait` may write now: headers out, socket open, client keeping up."""
        if not self._direct:
            return False
        transport = self._request.transport
        return (transport is not None and not transport.is_closing()
                and transport.get_write_buffer_size() <= _HIGH_WATER_BYTES)

    def write_nowait(self, payloads: list[dict[str, Any]]) -> None:
        """Write now (call only when `writable()`); the events of one call go in one chunk."""
        if payloads:
            self._write_chunk(b"".join(_event(p) for p in payloads))

    def _write_chunk(self, data: bytes) -> None:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client closed the connection")
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    async def send_error(self, error: dict[str, Any]) -> None:
        await self.response.write(_event({"error": error}) + _DONE)

    async def done(self) -> None:
        await self.response.write(_DONE)
        await self.response.write_eof()


class ChatChunks:
    """Builds `chat.completion.chunk` payloads."""

    def __init__(self, completion_id: str, model: str, created: int, texts: TokenTexts, *,
                 logprobs: bool, include_usage: bool, tools: ToolConfig | None = None) -> None:
        self._base = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                      "model": model, "system_fingerprint": None}
        self._texts = texts
        self._logprobs = logprobs
        self._include_usage = include_usage
        self._tools = tools
        self._tool_streams: dict[int, ToolStream] = {}

    def chunks(self, deltas: list[ChoiceDelta]) -> list[dict[str, Any]]:
        out = []
        for d in deltas:
            if d.first:  # the role alone first, as OpenAI does
                out.append(self._chunk(d.index, {"role": "assistant", "content": ""}, None, None))
            if self._tools is not None:  # content and tool-call deltas (server/tools.py)
                stream = self._tool_streams.setdefault(d.index, ToolStream(self._tools))
                logprobs = chat_logprobs(self._texts, d.logprobs) if self._logprobs and d.logprobs else None
                payloads = stream.feed(d.text, d.finish_reason is not None)
                for k, payload in enumerate(payloads):
                    out.append(self._chunk(d.index, payload, logprobs if k == 0 else None, None))
                if logprobs is not None and not payloads:
                    out.append(self._chunk(d.index, {}, logprobs, None))
                if d.finish_reason:
                    reason = "tool_calls" if stream.num_calls else d.finish_reason
                    out.append(self._chunk(d.index, {}, None, reason))
                continue
            if d.text or d.token_ids or d.logprobs or d.finish_reason:
                delta = {"content": d.text} if (d.text or d.token_ids or d.logprobs) else {}
                logprobs = chat_logprobs(self._texts, d.logprobs) if self._logprobs and d.logprobs else None
                out.append(self._chunk(d.index, delta, logprobs, d.finish_reason))
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._base, "choices": [], "usage": usage}

    def _chunk(self, index: int, delta: dict[str, Any], logprobs: Any, finish_reason: str | None) -> dict[str, Any]:
        chunk = {**self._base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                            "finish_reason": finish_reason}]}
        if self._include_usage:
            chunk["usage"] = None
        return chunk


class CompletionChunks:
    """Builds legacy `text_completion` stream payloads (echo puts the prompt in the first one)."""

    def __init__(self, completion_id: str, model: str, created: int, texts: TokenTexts, *,
                 logprobs: bool, include_usage: bool, echo_texts: list[str] | None,
                 echo_ids: list[list[int]] | None, n: int,
                 prompt_logprobs: dict[int, list[Any]] | None = None) -> None:
        self._base = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                      "system_fingerprint": None}
        self._texts = texts
        self._logprobs = logprobs
        self._include_usage = include_usage
        self._echo_texts = echo_texts
        self._echo_ids = echo_ids
        self._n = n
        self._prompt_logprobs = prompt_logprobs if prompt_logprobs is not None else {}  # [apps] tracker's
        self._offsets: dict[int, int] = {}

    def chunks(self, deltas: list[ChoiceDelta]) -> list[dict[str, Any]]:
        out = []
        for d in deltas:
            prompt_index = d.index // self._n
            text = d.text
            echo_ids = None
            if d.first and self._echo_texts is not None:
                text = self._echo_texts[prompt_index] + text
                echo_ids = self._echo_ids[prompt_index] if self._echo_ids else None
            logprobs = None
            if self._logprobs:
                start = self._offsets.get(d.index, 0)
                logprobs = completion_logprobs(
                    self._texts, d.logprobs, text_offset_start=start, echo_prompt_ids=echo_ids,
                    prompt_logprobs=self._prompt_logprobs.get(prompt_index) if echo_ids is not None else None)
                self._offsets[d.index] = start + len(text)
            if not (text or d.token_ids or d.finish_reason or logprobs and logprobs["tokens"]):
                continue
            chunk = {**self._base, "choices": [{"index": d.index, "text": text, "logprobs": logprobs,
                                                "finish_reason": d.finish_reason}]}
            if self._include_usage:
                chunk["usage"] = None
            out.append(chunk)
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._base, "choices": [], "usage": usage}
