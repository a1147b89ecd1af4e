"""Constrained decoding in the engine core: a request whose grammar is still compiling waits
without holding anyone else up, and constrained output matches its grammar with async
scheduling on and off."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from appliance.engine.outputs import OutputAccumulator
from appliance.engine.sequence import SamplingParams
from appliance.structured.spec import GrammarSpec, json_schema_spec

from .conftest import chat_ids, engine_config, run_to_completion

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer"},
                                           "pet": {"enum": ["cat", "dog"]}},
          "required": ["name", "age", "pet"], "additionalProperties": False}


def test_a_compiling_grammar_holds_only_its_own_request(engine) -> None:
    prompt = chat_ids(engine.tokenizer, "Describe a person as JSON.")
    # Occupy the compile pool: the constrained request's compile queues behind this gate.
    gate = threading.Event()
    blocker = engine.structured.compiler._pool.submit(gate.wait)
    try:
        spec = json_schema_spec({**SCHEMA, "title": "held"}, "test")  # a spec no earlier test compiled
        engine.add_request("held", prompt, SamplingParams(max_tokens=40, temperature=0.0, structured=spec))
        engine.add_request("free", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        accs = {"held": OutputAccumulator("held", prompt, keep_all=True),
                "free": OutputAccumulator("free", prompt, keep_all=True)}
        finished: list[str] = []
        while "free" not in finished:
            for delta in engine.step():
                accs[delta.request_id].add(delta)
                if delta.finished:
                    finished.append(delta.request_id)
        assert finished == ["free"] and not accs["held"].has_news  # it has not even started
        assert engine.structured.num_held == 1
    finally:
        gate.set()
        blocker.result()
    while "held" not in finished:
        for delta in engine.step():
            accs[delta.request_id].add(delta)
            if delta.finished:
                finished.append(delta.request_id)
    jsonschema.validate(json.loads(accs["held"].output().outputs[0].text), SCHEMA)


@pytest.mark.parametrize(("async_scheduling", "fill_threads"), [(True, 0), (False, 0), (True, 2)])
def test_constrained_rows_beside_free_ones(default_model_dir, async_scheduling: bool, fill_threads: int) -> None:
    from dataclasses import replace

    from appliance.engine.llm_engine import EngineCore

    core = EngineCore(replace(engine_config(default_model_dir, max_num_seqs=8), async_scheduling=async_scheduling))
    core.structured.fill_threads = fill_threads  # 2: masks filled by xgrammar's batch matcher
    prompt = chat_ids(core.tokenizer, "Tell me about a person.")
    regex = GrammarSpec("regex", r"[A-Z][a-z]{2,8} is [0-9]{2}\.")
    out = run_to_completion(core, {
        "json": (prompt, SamplingParams(max_tokens=48, temperature=0.0, structured=json_schema_spec(SCHEMA, "t"))),
        "regex": (prompt, SamplingParams(max_tokens=20, temperature=0.8, seed=5, n=2, structured=regex)),
        "free": (prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
    })
    jsonschema.validate(json.loads(out["json"].outputs[0].text), SCHEMA)
    assert all(re.fullmatch(r"[A-Z][a-z]{2,8} is [0-9]{2}\.", o.text) for o in out["regex"].outputs)
    assert len(out["free"].outputs[0].token_ids) == 12
    assert core.structured.num_held == 0 and not core.has_unfinished_requests()
