"""ProcessAsyncEngine: the same interface with the EngineCore in a child process."""

from __future__ import annotations

import os
import signal

import openai
import pytest

from appliance.engine.sequence import SamplingParams
from appliance.errors import EngineDeadError, PromptTooLongError

from .conftest import MAX_MODEL_LEN, MODEL, engine_config, wait_until

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def process_engine(server_loop, default_model_dir):
    from appliance.engine.process_engine import ProcessAsyncEngine

    async def start():
        eng = await ProcessAsyncEngine.spawn(engine_config(default_model_dir, kv_bytes=64 << 20))
        await eng.start()
        return eng

    eng = server_loop.call(start())
    yield eng
    server_loop.call(eng.shutdown())


def test_same_answers_as_the_thread_engine(serve, process_engine):
    in_thread = serve().client()
    in_child = serve(engine_=process_engine).client()
    expected = in_thread.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                                 logprobs=True, top_logprobs=2)
    got = in_child.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                           logprobs=True, top_logprobs=2)
    assert got.choices[0].message.content == expected.choices[0].message.content
    assert got.usage.model_dump() == expected.usage.model_dump()
    assert [e.token for e in got.choices[0].logprobs.content] == [e.token for e in expected.choices[0].logprobs.content]
    chunks = list(in_child.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0,
                                                   stream=True, n=2))
    for index in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == index)
        assert text == expected.choices[0].message.content


def test_rejection_and_abort(serve, server_loop, process_engine):
    async def too_long() -> None:
        async for _ in process_engine.generate("pe-long", [1] * (MAX_MODEL_LEN + 2), SamplingParams(max_tokens=1)):
            pass

    with pytest.raises(PromptTooLongError):
        server_loop.call(too_long())
    client = serve(engine_=process_engine).client()
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


def test_a_killed_child_fails_requests(serve, server_loop, process_engine):
    client = serve(engine_=process_engine).client()
    assert process_engine.is_progressing(60.0)
    os.kill(process_engine.pid, signal.SIGKILL)
    wait_until(lambda: process_engine.dead, what="the engine to notice its child died")
    assert isinstance(process_engine.error, EngineDeadError) and process_engine.dead_event.is_set()
    assert not process_engine.is_progressing(60.0)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)


def test_a_load_failure_is_reported_with_its_cause(server_loop, tmp_path):
    from appliance.config import EngineConfig, ModelConfig
    from appliance.engine.process_engine import ProcessAsyncEngine
    from appliance.errors import ModelLoadError

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as info:
        server_loop.call(ProcessAsyncEngine.spawn(EngineConfig(model=ModelConfig(model=str(missing), device="cpu"))))
    assert "no-such-model" in str(info.value)
