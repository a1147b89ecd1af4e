"""The separate engine process (ProcessClient) on its own: what only a process can do.

Everything a route does is run with both clients by the shared, parametrized `engine` fixture;
here a process engine of this module's own is killed under load, and a load failure in the
child is reported with its cause.
"""

from __future__ import annotations

import os
import signal
import threading

import openai
import pytest

from appliance.errors import EngineDeadError

from .conftest import MODEL, engine_config, http_request, spawn_engine, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def process_engine(server_loop, default_model_dir):
    eng = server_loop.call(spawn_engine(engine_config(default_model_dir, kv_bytes=64 << 20)), timeout_s=600)
    yield eng
    server_loop.call(eng.shutdown())


def test_rejection_before_the_engine_and_abort_on_disconnect(serve_own, server_loop, process_engine):
    client = serve_own(process_engine).client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[1] * 5000, max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"
    before = process_engine.stats().generation_tokens_total
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    wait_until(lambda: process_engine.stats().num_kv_blocks_used == 0 and process_engine.stats().num_running == 0,
               what="the child's blocks to be freed")
    assert process_engine.stats().generation_tokens_total - before < 400  # aborted, not run to the end


def test_killing_the_engine_process_under_load_fails_streams_and_health(serve_own, process_engine):
    served = serve_own(process_engine)
    client = served.client()
    assert http_request("GET", served.base_url + "/health").status_code == 200
    errors: list[BaseException] = []
    started = threading.Semaphore(0)

    def stream(i: int) -> None:
        chunks = client.completions.create(model=MODEL, prompt=f"Count to {i}00:", max_tokens=500, stream=True,
                                           extra_body={"ignore_eos": True})
        try:
            for k, _chunk in enumerate(chunks):
                if k == 2:
                    started.release()
        except openai.APIError as exc:  # the error event after the 200
            errors.append(exc)

    workers = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for _ in workers:
        assert started.acquire(timeout=120), "streams did not start"
    os.kill(process_engine.client.pid, signal.SIGKILL)
    for w in workers:
        w.join(60)
    assert len(errors) == 4 and all(e.body["type"] == "engine_error" for e in errors)
    wait_until(lambda: process_engine.dead, what="the engine to notice its process died")
    assert isinstance(process_engine.error, EngineDeadError)
    assert "was killed by signal SIGKILL" in str(process_engine.error)
    assert process_engine.dead_event.is_set() and not process_engine.is_progressing(60.0)
    health = http_request("GET", served.base_url + "/health")
    assert health.status_code == 503 and health.json()["engine"] == "dead"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)


def test_a_load_failure_is_reported_with_its_cause(server_loop, tmp_path):
    from appliance.config import EngineConfig, ModelConfig
    from appliance.engine.core_process import ProcessClient
    from appliance.errors import ModelLoadError

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        server_loop.call(ProcessClient.spawn(EngineConfig(model=ModelConfig(model=str(missing), device="cpu"))))
    assert "no-such-model" in str(info.value)
