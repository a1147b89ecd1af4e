"""Cascade attention end to end on CPU: a shared-prefix workload gives the same greedy tokens with
engine.cascade_attention = "auto" (decode steps attend the shared prefix once, through the torch
reference of the cascade kernels) as with "off", and "auto" does take the cascade path.

The prompts share a ~360-token prefix (more than CASCADE_MIN_PREFIX_TOKENS) and arrive at once
under a small token budget, so the first ones are prefilled before the prefix cache holds the
prefix: they keep private copies of it (rows with no share of the cascade), the later ones share
the first writer's blocks. One request with n = 8 adds forks that share its own prompt's blocks.
"""

from __future__ import annotations

import dataclasses

import pytest

from appliance.config import load_config
from appliance.engine import model_runner
from appliance.engine.llm_engine import EngineCore
from appliance.engine.sequence import SamplingParams
from appliance.errors import ConfigError

from .conftest import CHAT_PROMPTS, engine_config, run_to_completion


def _outputs(engine: EngineCore, prompts: dict[str, list[int]], forked: list[int]) -> dict[str, list[list[int]]]:
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    requests = {rid: (ids, greedy) for rid, ids in prompts.items()}
    requests["n8"] = (forked, dataclasses.replace(greedy, n=8))
    done = run_to_completion(engine, requests)
    return {rid: [choice.token_ids for choice in out.outputs] for rid, out in done.items()}


def _static_graphs(engine: EngineCore) -> list[int]:
    """Route decode steps through the decode graphs' static inputs (plain forwards on CPU, as
    tests/engine/test_prefill_graphs.py does for lone prefills); returns the sizes of the cascade
    "graphs" replayed."""
    runner = engine.runner
    runner._setup_decode_graphs(capture=False)
    replayed: list[int] = []
    for size, graph in runner.cascade_graphs.items():
        replay = graph.replay

        def counting(size: int = size, replay=replay) -> None:
            replayed.append(size)
            replay()

        graph.replay = counting
    return replayed


def test_shared_prefix_greedy_outputs_match_with_cascade_off(default_model_dir) -> None:
    """Eager steps, and decode steps through the graphs' static inputs (the padded rows, the
    cascade buffer filled by a device copy from the step's one upload)."""
    base = engine_config(default_model_dir, max_num_batched_tokens=512, max_num_seqs=24)
    configs = {mode: dataclasses.replace(base, cascade_attention=mode, cuda_graph_batch_sizes=(8, 16, 24))
               for mode in ("auto", "off")}
    engines = {mode: EngineCore(config) for mode, config in configs.items()}
    engines["graphs"] = EngineCore(configs["auto"])
    replayed = _static_graphs(engines["graphs"])
    assert sorted(engines["graphs"].runner.cascade_graphs) == [8, 16, 24]
    tok = engines["auto"].tokenizer
    shared = tok.encode(" ".join(CHAT_PROMPTS) * 4)
    assert len(shared) >= model_runner.CASCADE_MIN_PREFIX_TOKENS + 32
    prompts = {f"p{i}": shared + tok.encode(" " + text) for i, text in enumerate(CHAT_PROMPTS + CHAT_PROMPTS[:4])}
    forked = tok.encode(" ".join(reversed(CHAT_PROMPTS)) * 3)
    got = {mode: _outputs(engine, prompts, forked) for mode, engine in engines.items()}
    assert got["auto"] == got["off"]
    assert got["graphs"] == got["off"]
    assert engines["off"].runner.cascade_steps == 0
    assert engines["auto"].runner.cascade_min_seqs == model_runner.CASCADE_MIN_SEQS
    assert engines["auto"].runner.cascade_steps >= 5
    assert len(replayed) >= 5 and set(replayed) > {16}, replayed  # several batch sizes, padded rows too
    assert int(engines["graphs"].runner._gc_buf[0]) >= model_runner.CASCADE_MIN_PREFIX_TOKENS  # the last prefix
    assert engines["auto"].stats().prefix_cache_hits > 0


def test_a_bad_cascade_value_names_the_key(tmp_path) -> None:
    path = tmp_path / "appliance.toml"
    path.write_text('[engine]\ncascade_attention = "on"\n')
    with pytest.raises(ConfigError, match=r'engine\.cascade_attention.*"auto", "off"'):
        load_config(str(path))
    path.write_text('[engine]\ncascade_attention = "off"\n')
    assert load_config(str(path)).engine.cascade_attention == "off"
