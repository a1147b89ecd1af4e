"""Every error class from a real request, parsed by the SDK into the right exception type."""

from __future__ import annotations

import threading

import openai
import pytest

from appliance.config import AppConfig, ClientConfig, ServerConfig
from appliance.engine.async_engine import AsyncEngine
from appliance.server.state import ServiceState

from .conftest import MAX_MODEL_LEN, MODEL, GatedCore, engine_config, http_request, inline_engine, wait_until

USER = [{"role": "user", "content": "Hello"}]


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert exc.response.headers["x-request-id"]
    return body["error"]


def test_400_validation_names_the_parameter(serve):
    client = serve().client()
    cases = [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 0}, "n"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"extra_body": {"messages": [{"role": "wizard", "content": "x"}]}}, "messages[0].role"),
        ({"max_tokens": MAX_MODEL_LEN + 1}, "max_tokens"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=USER, **kwargs)
        error = _error(info.value)
        assert error["param"] == param and error["type"] == "invalid_request_error", (kwargs, error)


def test_400_chat_template_errors_point_to_the_right_route(serve, engine, monkeypatch):
    client = serve().client()
    # A malformed message is named by its parameter.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": {"bad": 1}}])
    assert _error(info.value)["param"].startswith("messages")
    # A model without a chat template: chat is refused, completions still serve it.
    monkeypatch.setattr(engine.tokenizer, "chat_template", None)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=USER)
    error = _error(info.value)
    assert error["param"] == "messages" and error["message"].endswith("use /v1/completions"), error
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=1).choices[0].text is not None


def test_400_prompt_too_long_and_bad_json(serve):
    served = serve()
    client = served.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[7] * (MAX_MODEL_LEN + 3), max_tokens=1)
    assert _error(info.value)["code"] == "context_length_exceeded"
    response = http_request("POST", served.base_url + "/v1/chat/completions", content=b"{not json")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_401_missing_or_wrong_key(serve):
    served = serve(AppConfig(clients=(ClientConfig(name="app", api_key="sk-right"),)))
    for key in ("sk-wrong", "sk-righ", "sk-right-and-more"):
        with pytest.raises(openai.AuthenticationError) as info:
            served.client(api_key=key).models.list()
        assert _error(info.value)["code"] == "invalid_api_key"
    assert http_request("GET", served.base_url + "/v1/models").status_code == 401  # no header at all
    assert served.client(api_key="sk-right").models.list().data[0].id == MODEL
    # /health never needs a key; /metrics only when configured so.
    assert http_request("GET", served.base_url + "/health").status_code == 200
    assert http_request("GET", served.base_url + "/metrics").status_code == 200


def test_keys_reload_live(serve, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sk-old\n")
    clients = (ClientConfig(name="filed", api_key_file=str(key_file)),)
    served = serve(AppConfig(clients=clients))
    assert served.client(api_key="sk-old").models.list().data
    key_file.write_text("sk-new\n")
    served.state.set_clients(clients)  # what the daemon does on SIGHUP
    with pytest.raises(openai.AuthenticationError):
        served.client(api_key="sk-old").models.list()
    assert served.client(api_key="sk-new").models.list().data


def test_metrics_can_require_a_key(serve):
    served = serve(AppConfig(server=ServerConfig(metrics_require_auth=True),
                             clients=(ClientConfig(name="ops", api_key="k1"),)))
    assert http_request("GET", served.base_url + "/metrics").status_code == 401
    assert http_request("GET", served.base_url + "/metrics", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_404_unknown_model_and_route(serve):
    served = serve()
    client = served.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=USER)
    assert _error(info.value)["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=MODEL, input="x")  # a route we do not have


def test_413_body_too_large(serve):
    client = serve(AppConfig(server=ServerConfig(max_body_bytes=4096))).client()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 10_000}])
    assert info.value.status_code == 413
    assert _error(info.value)["code"] == "request_too_large"


def test_429_has_retry_after(serve):
    served = serve(AppConfig(clients=(ClientConfig(name="a", api_key="ka", requests_per_minute=1),)))
    client = served.client(api_key="ka")
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert _error(info.value)["type"] == "rate_limit_error"


def test_503_while_draining_or_loading(serve):
    state = ServiceState("ready")
    served = serve(state=state)
    client = served.client()
    state.begin_drain()
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
    assert info.value.status_code == 503 and int(info.value.response.headers["retry-after"]) >= 1
    assert _error(info.value)["code"] == "service_draining"
    health = http_request("GET", served.base_url + "/health")
    assert health.status_code == 503 and health.json()["phase"] == "draining" and "retry-after" in health.headers
    state.resume()
    assert client.chat.completions.create(model=MODEL, messages=USER, max_tokens=1).choices
    assert http_request("GET", served.base_url + "/health").status_code == 200
    state.set_phase("loading")
    assert http_request("GET", served.base_url + "/health").status_code == 503
    state.set_phase("ready")


def test_health_503_while_the_engine_is_stalled(serve, gate):
    state = ServiceState("ready", stall_timeout_s=0.3)
    served = serve(state=state)
    gate.clear()  # the engine thread will block inside step()
    done = threading.Event()

    def request() -> None:
        served.client().chat.completions.create(model=MODEL, messages=USER, max_tokens=1)
        done.set()

    worker = threading.Thread(target=request)
    worker.start()
    wait_until(lambda: http_request("GET", served.base_url + "/health").status_code == 503, what="a stalled /health")
    assert http_request("GET", served.base_url + "/health").json()["engine"] == "stalled"
    gate.set()
    worker.join(60)
    assert done.is_set()
    wait_until(lambda: http_request("GET", served.base_url + "/health").status_code == 200, what="/health to recover")


@pytest.fixture(scope="module")
def doomed(server_loop, default_model_dir):
    """A second real engine (small KV) whose step() can be made to raise."""
    from appliance.engine.llm_engine import EngineCore

    core = GatedCore(EngineCore(engine_config(default_model_dir, kv_bytes=16 << 20)))

    async def start() -> AsyncEngine:
        eng = inline_engine(core)
        await eng.start()
        return eng

    eng = server_loop.call(start())
    yield core, eng
    server_loop.call(eng.shutdown())


def test_500_engine_failure_mid_stream_and_after(serve_own, doomed, server_loop):
    core, eng = doomed
    served = serve_own(eng)
    client = served.client()
    assert client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2).choices  # healthy
    core.fail_after_steps = 4  # prefill + a few decode steps, then the engine dies
    stream = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=50, stream=True,
                                            extra_body={"ignore_eos": True})
    received = []
    with pytest.raises(openai.APIError) as info:  # an error event after the 200
        for chunk in stream:
            received.append(chunk)
    assert received and not isinstance(info.value, openai.APIStatusError)
    assert info.value.body["type"] == "engine_error"
    wait_until(lambda: eng.dead, what="the engine to be marked dead")
    assert isinstance(eng.error, RuntimeError) and eng.dead_event.is_set()
    assert not eng.is_progressing(60.0)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
    assert info.value.status_code == 500 and _error(info.value)["type"] == "engine_error"
    assert http_request("GET", served.base_url + "/health").status_code == 503
    assert served.state.inflight_count == 0


def test_long_bodies_parsed_on_the_parse_threads_answer_and_fail_as_inline_ones(serve):
    """Bodies over 2 KB are parsed and tokenized on the app's parse threads: a valid one serves,
    an invalid one is the same 400 naming its parameter, and a burst of them all answer."""
    client = serve().client()
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 80  # ~3.6 KB
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=2, temperature=-1)
    assert _error(info.value)["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_prompt}],
                                       max_tokens=MAX_MODEL_LEN + 1)
    assert _error(info.value)["param"] == "max_tokens"
    answers: list[int] = []

    def ask(i: int) -> None:
        out = client.completions.create(model=MODEL, prompt=f"{i} " + long_prompt, max_tokens=2)
        answers.append(out.usage.prompt_tokens)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 6 and min(answers) > 700
