"""Per-client quotas and the admission queue bound are exact: the N+1th request gets 429."""

from __future__ import annotations

import asyncio

import openai
import pytest

from appliance.config import AppConfig, ClientConfig, ServerConfig
from appliance.server.quotas import AdmissionQueue, QuotaBook, RateLimitedError

from .conftest import MODEL, chat_prompt_len, wait_until

USER = [{"role": "user", "content": "Hello"}]


def _code(exc: openai.APIStatusError) -> str:
    return exc.response.json()["error"]["code"]


# ----- the bookkeeping, with explicit clocks --------------------------------------------------


def test_request_window_slides():
    book = QuotaBook((ClientConfig(name="a", api_key="k", requests_per_minute=3),))
    tickets = [book.admit("a", 0, now=t) for t in (0.0, 10.0, 20.0)]
    with pytest.raises(RateLimitedError) as info:
        book.admit("a", 0, now=30.0)
    assert info.value.retry_after_s == pytest.approx(30.0)  # the first one leaves the window at 60
    for ticket in tickets:
        book.settle(ticket, 0)
    book.admit("a", 0, now=60.0)  # the one from t=0 has expired
    with pytest.raises(RateLimitedError):
        book.admit("a", 0, now=61.0)


def test_token_window_books_reservations_then_actual_use():
    book = QuotaBook((ClientConfig(name="a", api_key="k", tokens_per_minute=100),))
    first = book.admit("a", 60, now=0.0)
    with pytest.raises(RateLimitedError):
        book.admit("a", 41, now=1.0)
    book.settle(first, 20)  # it used 20 of the 60 it reserved
    book.admit("a", 80, now=2.0)
    with pytest.raises(RateLimitedError):
        book.admit("a", 1, now=3.0)


def test_set_clients_keeps_usage_and_changes_limits():
    book = QuotaBook((ClientConfig(name="a", api_key="k", requests_per_minute=2),))
    book.admit("a", 0, now=0.0)
    book.admit("a", 0, now=0.0)
    book.set_clients((ClientConfig(name="a", api_key="k", requests_per_minute=3),))
    book.admit("a", 0, now=1.0)
    with pytest.raises(RateLimitedError):
        book.admit("a", 0, now=1.0)


def test_admission_queue_bounds():
    queue = AdmissionQueue(max_requests=2, max_tokens=100)
    queue.enter(10)
    queue.enter(10)
    with pytest.raises(RateLimitedError):
        queue.enter(1)
    queue.leave(10)
    with pytest.raises(RateLimitedError):
        queue.enter(91)
    queue.enter(90)


# ----- through the real server ----------------------------------------------------------------


def test_requests_per_minute_exact_and_per_client(serve):
    served = serve(AppConfig(clients=(
        ClientConfig(name="a", api_key="ka", requests_per_minute=3),
        ClientConfig(name="b", api_key="kb"),
    )))
    a, b = served.client(api_key="ka"), served.client(api_key="kb")
    for _ in range(3):
        a.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        a.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert _code(info.value) == "rate_limit_exceeded" and int(info.value.response.headers["retry-after"]) > 1
    with pytest.raises(openai.RateLimitError):
        a.completions.create(model=MODEL, prompt="x", max_tokens=1)
    for _ in range(4):  # another client is not limited by a's quota
        b.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)


def test_tokens_per_minute_exact(serve, tokenizer):
    prompt_len = chat_prompt_len(tokenizer, "Hello")
    max_tokens = 3
    per_request = prompt_len + max_tokens  # ignore_eos: the reservation is exactly what it uses
    served = serve(AppConfig(clients=(ClientConfig(name="t", api_key="kt", tokens_per_minute=2 * per_request),)))
    client = served.client(api_key="kt")
    for _ in range(2):
        out = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=max_tokens,
                                             extra_body={"ignore_eos": True})
        assert out.usage.total_tokens == per_request
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert _code(info.value) == "tokens_limit_exceeded"


async def _blocked_streams(client: openai.AsyncOpenAI, count: int) -> list[asyncio.Task]:
    async def one() -> str:
        stream = await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    return [asyncio.create_task(one()) for _ in range(count)]


async def test_concurrent_requests_exact(serve, gate):
    served = serve(AppConfig(clients=(ClientConfig(name="c", api_key="kc", max_concurrent_requests=2),)))
    client = served.async_client(api_key="kc")
    gate.clear()  # the engine stops stepping: admitted requests stay in flight
    tasks = await _blocked_streams(client, 2)
    await asyncio.to_thread(wait_until, lambda: served.state.inflight_count == 2, what="two requests in flight")
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert _code(info.value) == "concurrency_limit_exceeded"
    gate.set()
    assert all(isinstance(t, str) for t in await asyncio.gather(*tasks))
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)  # a slot is free again
    await client.close()


async def test_admission_queue_bound_exact(serve, gate, tokenizer):
    served = serve(AppConfig(server=ServerConfig(max_queued_requests=3)))
    client = served.async_client()
    gate.clear()
    tasks = await _blocked_streams(client, 3)
    await asyncio.to_thread(wait_until, lambda: served.state.admission.num_requests == 3, what="a full queue")
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert _code(info.value) == "queue_full" and info.value.response.headers["retry-after"] == "1"
    gate.set()
    await asyncio.gather(*tasks)
    assert served.state.admission.num_requests == 0 and served.state.admission.num_tokens == 0
    await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    await client.close()


async def test_admission_queue_token_bound(serve, gate, tokenizer):
    prompt_len = chat_prompt_len(tokenizer, "Hello")
    served = serve(AppConfig(server=ServerConfig(max_queued_tokens=2 * prompt_len)))
    client = served.async_client()
    gate.clear()
    tasks = await _blocked_streams(client, 2)
    await asyncio.to_thread(wait_until, lambda: served.state.admission.num_tokens == 2 * prompt_len,
                            what="two prompts queued")
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert _code(info.value) == "queue_full"
    gate.set()
    await asyncio.gather(*tasks)
    await client.close()
