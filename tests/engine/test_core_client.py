"""The engine's outward contract without a model: which client `engine.process` picks, the wire
types round-tripping through the codec the engine process uses, and the one accumulator."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import msgspec
import pytest

from appliance.config import EngineConfig, ModelConfig, load_config
from appliance.engine.core_client import resolve_process_mode
from appliance.engine.messages import AbortRequests, AddRequest, FromCore, StepOutputs, ToCore, WireError
from appliance.engine.outputs import (
    CompletionDelta,
    EngineStats,
    OutputAccumulator,
    RequestDelta,
    RequestMetrics,
    TokenLogprob,
)
from appliance.engine.sequence import SamplingParams
from appliance.errors import ConfigError, PromptTooLongError
from appliance.structured.spec import GrammarSpec


@pytest.mark.parametrize(("process", "device", "want"), [
    ("auto", "cuda", "separate"), ("auto", "cuda:1", "separate"), ("auto", "cpu", "inline"),
    ("inline", "cuda", "inline"), ("separate", "cpu", "separate"),
])
def test_process_mode(process: str, device: str, want: str) -> None:
    config = EngineConfig(model=ModelConfig(device=device), process=process)
    assert resolve_process_mode(config) == want


def test_auto_on_a_machine_without_cuda_runs_inline() -> None:
    import torch

    want = "separate" if torch.cuda.is_available() else "inline"
    assert resolve_process_mode(EngineConfig(model=ModelConfig(device="auto"))) == want


def test_a_bad_process_value_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text('[engine]\nprocess = "subprocess"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    message = str(info.value)
    assert str(path) in message and "engine.process" in message and '"separate"' in message
    path.write_text('[engine]\nprocess = "separate"\n')
    assert load_config(str(path)).engine.process == "separate"


def test_messages_round_trip_through_the_engine_process_codec() -> None:
    params = SamplingParams(n=2, max_tokens=7, temperature=0.5, stop=["x"], stop_token_ids=[3], logprobs=2,
                            structured=GrammarSpec("regex", "[a-z]+"), logit_bias={5: -100.0})
    to_core = msgspec.msgpack.Decoder(ToCore)
    for message in (AddRequest("r1", [1, 2, 3], params, 12.5), AbortRequests(["r1", "r2"])):
        assert to_core.decode(msgspec.msgpack.encode(message)) == message
    delta = RequestDelta("r1", [CompletionDelta(1, [9], " a", [TokenLogprob(9, -0.5, [(9, -0.5), (4, -1.0)])],
                                                "stop", "x")], True, 16, RequestMetrics(1.0, 1.1, 1.2, 1.3, 0))
    stats = EngineStats(1, 0, 100, 10, 2, 0.1, 32, 16, 0, 40, 8, 3, 99.0)
    step = StepOutputs([delta], [("r2", WireError.of(PromptTooLongError("too long", param="messages")))], stats, True)
    got = msgspec.msgpack.Decoder(FromCore).decode(msgspec.msgpack.encode(step))
    assert got == step
    error = got.rejected[0][1].to_exception()
    assert isinstance(error, PromptTooLongError) and error.param == "messages"


def test_the_accumulator_merges_deltas_and_keeps_the_whole_output() -> None:
    acc = OutputAccumulator("r", [1, 2], keep_all=True)
    assert acc.take() is None
    acc.add(RequestDelta("r", [CompletionDelta(0, [5], "He", [TokenLogprob(5, -0.1, [])])], False))
    acc.add(RequestDelta("r", [CompletionDelta(0, [6], "", [TokenLogprob(6, -0.2, [])]),
                               CompletionDelta(1, [7], "Yo")], False))
    merged = acc.take()
    assert merged is not None and not merged.finished
    assert [(c.index, c.token_ids, c.text) for c in merged.outputs] == [(0, [5, 6], "He"), (1, [7], "Yo")]
    assert [lp.token_id for lp in merged.outputs[0].logprobs] == [5, 6]
    assert acc.take() is None  # nothing new since
    acc.add(RequestDelta("r", [CompletionDelta(0, [8], "llo", None, "length")], False))
    acc.abort(2)  # choice 1 never finished: it ends as "abort"
    last = acc.take()
    assert last is not None and last.finished
    assert [(c.index, c.token_ids, c.text, c.finish_reason) for c in last.outputs] == [
        (0, [8], "llo", "length"), (1, [], "", "abort")]
    whole = acc.output()
    assert [(c.token_ids, c.text, c.finish_reason) for c in whole.outputs] == [
        ([5, 6, 8], "Hello", "length"), ([7], "Yo", "abort")]
    assert whole.prompt_token_ids == [1, 2]


def test_an_engine_config_copy_keeps_the_process_choice() -> None:
    config = replace(EngineConfig(), process="inline")
    assert config.process == "inline" and EngineConfig().process == "auto"
