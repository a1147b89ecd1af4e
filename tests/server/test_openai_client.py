"""The official openai client (sync and async, streaming and not) against the real server."""

from __future__ import annotations

import math

import pytest

from .conftest import MODEL, chat_prompt_len, http_request

QUESTION = "What is the capital of France?"


def _chat(client, **kwargs):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], **kwargs)


def test_sync_chat_text_usage_and_finish_reasons(serve, tokenizer):
    served = serve()
    client = served.client()
    prompt_len = chat_prompt_len(tokenizer, QUESTION)

    full = _chat(client, max_tokens=24, temperature=0)
    choice = full.choices[0]
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-") and full.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content.strip()
    assert "Paris" in choice.message.content  # the default model knows this one
    assert full.usage.prompt_tokens == prompt_len
    assert full.usage.total_tokens == prompt_len + full.usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")

    # max_tokens cuts it: exactly that many tokens, finish_reason "length".
    short = _chat(client, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert choice.message.content.startswith(short.choices[0].message.content)

    # A stop string from the greedy answer ends it there: finish_reason "stop", the string cut.
    stopped = _chat(client, max_tokens=24, temperature=0, stop=["Paris"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == choice.message.content.split("Paris")[0]


def test_sync_chat_stream_matches_non_stream(serve):
    served = serve()
    client = served.client()
    whole = _chat(client, max_tokens=12, temperature=0)
    chunks = list(_chat(client, max_tokens=12, temperature=0, stream=True,
                        stream_options={"include_usage": True}))
    content_chunks = [c for c in chunks if c.choices]
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content_chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in content_chunks) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in content_chunks if c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format(serve):
    """The bytes on the wire: `data: {...}` events, then `data: [DONE]`."""
    served = serve()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    response = http_request("POST", served.base_url + "/v1/chat/completions", json_body=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"]
    raw = response.text
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_chat_n_and_logprobs(serve):
    client = serve().client()
    out = _chat(client, max_tokens=4, n=3, temperature=1.0, seed=7, logprobs=True, top_logprobs=3,
                extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 12
    for choice in out.choices:
        content = choice.logprobs.content
        assert len(content) == 4
        for entry in content:
            assert entry.logprob <= 0.0 and len(entry.top_logprobs) == 3
            tops = [t.logprob for t in entry.top_logprobs]
            assert tops == sorted(tops, reverse=True)
            assert entry.bytes == list(entry.token.encode())
        assert "".join(e.token for e in content) == choice.message.content

    greedy = _chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    for entry in greedy.choices[0].logprobs.content:  # greedy picks the top alternative
        assert entry.token == entry.top_logprobs[0].token
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-5)


async def test_async_completions(serve, tokenizer):
    served = serve()
    client = served.async_client()
    prompt = "The quick brown fox"
    whole = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert whole.usage.completion_tokens == 6 or whole.choices[0].finish_reason == "stop"

    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # Token-id prompts, several prompts at once, echo and logprobs.
    ids = tokenizer.encode(prompt)
    multi = await client.completions.create(model=MODEL, prompt=[ids, tokenizer.encode("Once upon a time")], max_tokens=4,
                                            temperature=0, echo=True, logprobs=2)
    assert [c.index for c in multi.choices] == [0, 1]
    echoed = tokenizer.decode(ids)
    assert multi.choices[0].text.startswith(echoed)
    assert whole.choices[0].text.startswith(multi.choices[0].text[len(echoed):])  # the same greedy run
    assert multi.choices[0].text.startswith(prompt) and multi.choices[1].text.startswith("Once upon a time")
    lp = multi.choices[0].logprobs
    # Echoed prompt tokens carry their prompt logprobs; the first has no context (None).
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1 : len(ids)])
    assert all(v <= 0 for v in lp.token_logprobs[len(ids):])
    assert len(lp.tokens) == len(ids) + 4 and all(len(t) == 2 for t in lp.top_logprobs[len(ids):])
    await client.close()


async def test_async_chat_stream(serve):
    client = serve().async_client()
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "Answer briefly."},
                               {"role": "user", "content": "Name a color."}],
        max_tokens=5, stream=True, n=2, extra_body={"ignore_eos": True})
    text: dict[int, str] = {0: "", 1: ""}
    finishes = {}
    async for chunk in stream:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "length", 1: "length"} and all(text.values())
    await client.close()


def test_models(serve):
    client = serve().client()
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_openapi_and_request_id(serve):
    served = serve()
    response = http_request("GET", served.base_url + "/openapi.json", headers={"x-request-id": "trace-123"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "trace-123"
    doc = response.json()
    assert doc["openapi"].startswith("3.") and "/v1/chat/completions" in doc["paths"]


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/nope"])
def test_every_response_has_a_request_id(serve, path):
    response = http_request("GET", serve().base_url + path)
    assert len(response.headers["x-request-id"]) == 32


def test_cors_only_when_configured(serve):
    from appliance.config import AppConfig, ServerConfig

    plain = serve()
    response = http_request("GET", plain.base_url + "/v1/models", headers={"Origin": "http://app.local"})
    assert "access-control-allow-origin" not in response.headers
    served = serve(AppConfig(server=ServerConfig(cors_allow_origins=("http://app.local",))))
    preflight = http_request("OPTIONS", served.base_url + "/v1/chat/completions",
                             headers={"Origin": "http://app.local", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://app.local"
    other = http_request("GET", served.base_url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
