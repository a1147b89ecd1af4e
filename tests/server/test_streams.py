"""Many streams at once; a stream cut mid-way (or cancelled by the operator) frees its blocks."""

from __future__ import annotations

import asyncio

import pytest

from .conftest import MODEL, http_request, wait_until


async def test_32_concurrent_streams_complete(serve):
    served = serve()
    client = served.async_client()

    async def one(i: int) -> tuple[str, str | None, int]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=6,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return text, finish, usage.completion_tokens

    before = served.engine.stats().generation_tokens_total
    results = await asyncio.gather(*(one(i) for i in range(32)))
    assert len(results) == 32
    assert all(finish == "length" and tokens == 6 and text for text, finish, tokens in results)
    assert served.engine.stats().generation_tokens_total - before == 32 * 6
    await client.close()


def _kv_idle(engine) -> bool:
    stats = engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.num_kv_blocks_used == 0


def test_cutting_a_stream_aborts_and_frees_blocks(serve):
    served = serve()
    engine = served.engine
    assert _kv_idle(engine)
    before = engine.stats().generation_tokens_total
    client = served.client()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a very long story."}],
        max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    received = 0
    for _chunk in stream:
        received += 1
        if received == 4:
            # The request holds blocks while it runs.
            assert engine.stats().num_kv_blocks_used > 0 and served.state.inflight_count == 1
            break
    stream.close()  # the client goes away mid-stream
    wait_until(lambda: _kv_idle(engine) and served.state.inflight_count == 0, what="the aborted stream's blocks")
    assert engine.num_inflight == 0  # the front end let the request go, and told the core
    # It was aborted, not run to its 400 tokens.
    assert engine.stats().generation_tokens_total - before < 400


def test_client_timeout_on_non_stream_aborts(serve):
    served = serve()
    engine = served.engine
    before = engine.stats().generation_tokens_total
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write an essay."}], "max_tokens": 400,
            "ignore_eos": True}
    with pytest.raises(TimeoutError):  # 400 tokens on CPU take far longer than that
        http_request("POST", served.base_url + "/v1/chat/completions", json_body=body, timeout_s=1.0)
    wait_until(lambda: _kv_idle(engine) and served.state.inflight_count == 0, what="the abandoned request")
    assert engine.stats().generation_tokens_total - before < 400


def test_operator_cancel_ends_the_stream_with_abort(serve, server_loop):
    served = serve()
    client = served.client()
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=400,
        stream=True, extra_body={"ignore_eos": True})
    finish = None
    for i, chunk in enumerate(stream):
        if i == 2:
            requests = served.state.requests()
            assert len(requests) == 1 and requests[0]["client"] == "anonymous"
            assert set(requests[0]) == {"id", "client", "route", "phase", "prompt_tokens", "completion_tokens",
                                        "age_s"}
            assert server_loop.call(served.state.cancel(requests[0]["id"]))
            assert not server_loop.call(served.state.cancel("no-such-request"))
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert finish == "abort"
    wait_until(lambda: _kv_idle(served.engine), what="the cancelled request's blocks")
    assert server_loop.call(served.state.wait_idle(5.0))


def _completion_stream(client, **kwargs) -> tuple[str, list[str], int, str | None]:
    """(text, the logprobs' tokens in order, events with a choice, finish reason) of one stream."""
    text, tokens, events, finish = "", [], 0, None
    for chunk in client.completions.create(model=MODEL, stream=True, **kwargs):
        if not chunk.choices:
            continue
        events += 1
        choice = chunk.choices[0]
        text += choice.text
        if choice.logprobs is not None:
            tokens += choice.logprobs.tokens
        finish = choice.finish_reason or finish
    return text, tokens, events, finish


def test_a_stream_that_keeps_up_gets_one_event_per_step_written_from_the_step_callback(serve, monkeypatch):
    """While the client reads, each engine step's event is written inside the step's delivery
    (SSEWriter.write_nowait through AsyncEngine.set_push), with no task switch per request."""
    from appliance.server import streaming

    direct = []
    write_nowait = streaming.SSEWriter.write_nowait

    def counting(self, payloads):
        direct.append(len(payloads))
        return write_nowait(self, payloads)

    monkeypatch.setattr(streaming.SSEWriter, "write_nowait", counting)
    client = serve().client()
    kwargs = dict(prompt="The capital of France is", max_tokens=12, temperature=0.0, logprobs=1,
                  extra_body={"ignore_eos": True})
    text, tokens, events, finish = _completion_stream(client, **kwargs)
    whole = client.completions.create(model=MODEL, **kwargs).choices[0]
    assert finish == "length" and text == whole.text and tokens == whole.logprobs.tokens
    assert len(tokens) == 12
    # The first event goes out with the headers and the last one ends the stream (the route's
    # task); the steps in between are pushed, one event each, unless a step came while the
    # task was still busy with the first (then two merge).
    assert events >= 11 and len(direct) >= 9 and set(direct) == {1}


@pytest.mark.parametrize("declined_every", [2, 3])
def test_a_client_that_falls_behind_gets_the_missed_steps_merged_in_order(serve, monkeypatch, declined_every):
    """When the socket is backed up (here: `writable()` says so on every k-th step), the step's
    delta waits in the accumulator, the route's task writes it after the drain, and the push path
    resumes after: nothing lost, nothing out of order, the same text as without streaming."""
    from appliance.server import streaming

    calls = []
    writable = streaming.SSEWriter.writable

    def backed_up_now_and_then(self):
        calls.append(None)
        return writable(self) and len(calls) % declined_every != 0

    monkeypatch.setattr(streaming.SSEWriter, "writable", backed_up_now_and_then)
    client = serve().client()
    kwargs = dict(prompt="Once upon a time", max_tokens=16, temperature=0.0, logprobs=2, n=2,
                  extra_body={"ignore_eos": True})
    streamed: dict[int, list] = {0: ["", []], 1: ["", []]}
    for chunk in client.completions.create(model=MODEL, stream=True, **kwargs):
        for choice in chunk.choices:
            streamed[choice.index][0] += choice.text
            streamed[choice.index][1] += choice.logprobs.tokens
    whole = client.completions.create(model=MODEL, **kwargs)
    assert len(calls) >= 8  # the push path was asked at (nearly) every step
    for choice in whole.choices:
        assert streamed[choice.index][0] == choice.text
        assert streamed[choice.index][1] == choice.logprobs.tokens and len(choice.logprobs.tokens) == 16


def test_an_http_1_0_client_gets_a_whole_stream_without_chunked_framing(serve):
    """HTTP/1.0 has no chunked encoding: the events go through aiohttp's own writes (the push path
    writes HTTP/1.1 chunks, so it stays off) and the body ends when the connection closes."""
    import json
    import socket
    from urllib.parse import urlsplit

    served = serve()
    url = urlsplit(served.base_url)
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True,
                       "ignore_eos": True}).encode()
    with socket.create_connection((url.hostname, url.port), timeout=60) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        raw = b""
        while chunk := conn.recv(65536):
            raw += chunk
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head.lower(), head
    events = [line[6:] for line in payload.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert sum(1 for c in chunks if c["choices"]) >= 5
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
