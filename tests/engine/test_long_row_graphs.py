"""Long-row decode graphs: a second decode graph for the small batch sizes whose split-KV partition
count depends on the rows' length (kernels/attention.py caps it at 16 under LONG_ROW_KEYS keys and
at 64 from there).

On CUDA each family is a captured graph; here (CPU) both run eagerly over the same static inputs
(`_setup_decode_graphs(capture=False)`), so the choice between them, the bound each records and
the shared logits buffer are checked against plain eager steps. LONG_ROW_KEYS is lowered so that
the 135M model's short chat prompts cross it within a few tokens.
"""

from __future__ import annotations

import dataclasses

import torch
from appliance_kernels import attention as triton_attention

from appliance.engine.llm_engine import EngineCore
from appliance.engine.sequence import SamplingParams
from appliance.layers.attention import short_decode_bound

from .conftest import CHAT_PROMPTS, chat_ids, engine_config, run_to_completion

CPU = torch.device("cpu")


def test_the_short_bound_is_only_for_sizes_whose_partitions_differ() -> None:
    long = triton_attention.LONG_ROW_KEYS
    # 8 KV heads on 132 SMs: 1 row wants 33 partitions (16 short / 64 long), 2 rows 17 (16 / 32),
    # 4 rows 9 (16 / 16): only sizes 1 and 2 need a second graph.
    assert short_decode_bound(1, 8, 131072, CPU) == long - 1
    assert short_decode_bound(2, 8, 131072, CPU) == long - 1
    assert short_decode_bound(4, 8, 131072, CPU) is None
    assert short_decode_bound(64, 8, 131072, CPU) is None
    # A server configured below LONG_ROW_KEYS has one family, as before.
    assert short_decode_bound(1, 8, long - 1, CPU) is None
    assert short_decode_bound(1, 8, 4096, CPU) is None


def test_long_rows_replay_the_long_graph_and_match_eager(monkeypatch, engine, default_model_dir) -> None:
    monkeypatch.setattr(triton_attention, "LONG_ROW_KEYS", 48)
    monkeypatch.setattr(triton_attention, "_MIN_KEYS_PER_SPLIT", 1)  # so 47 keys still allow 16 partitions
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    prompts = {f"p{i}": chat_ids(engine.tokenizer, p) for i, p in enumerate(CHAT_PROMPTS[:2])}
    assert all(30 <= len(ids) < 48 for ids in prompts.values()), [len(ids) for ids in prompts.values()]

    def run(core: EngineCore, one_at_a_time: bool) -> dict[str, list[int]]:
        if one_at_a_time:
            return {rid: run_to_completion(core, {rid: (ids, params)})[rid].outputs[0].token_ids
                    for rid, ids in prompts.items()}
        done = run_to_completion(core, {rid: (ids, params) for rid, ids in prompts.items()})
        return {rid: out.outputs[0].token_ids for rid, out in done.items()}

    config = dataclasses.replace(engine_config(default_model_dir, max_num_batched_tokens=512),
                                 cuda_graph_batch_sizes=(1, 2, 4, 8))
    want = {mode: run(EngineCore(config), mode) for mode in (True, False)}
    static = EngineCore(config)
    runner = static.runner
    bounds: dict[int, set[int]] = {}
    graph_meta = runner._graph_meta

    def recording(size: int, cascade: bool = False, max_seq_len: int | None = None):
        meta = graph_meta(size, cascade, max_seq_len)
        bounds.setdefault(size, set()).add(meta.max_seq_len)
        return meta

    runner._graph_meta = recording
    runner._setup_decode_graphs(capture=False)
    # The 135M has 3 KV heads: 1, 2 and 4 rows want more partitions for long rows than the cap of
    # 16; 8 rows want 11, under it either way.
    sizes = runner._graph_sizes()
    assert sizes == [1, 2, 4, 8]
    want_long = [s for s in sizes if s <= 4]
    assert sorted(runner.long_graphs) == want_long
    assert runner._short_bound == dict.fromkeys(want_long, 47)
    for size in want_long:
        assert runner.long_graphs[size]._out is runner.graphs[size]._out  # one logits buffer per size
    steps_before = runner.step_paths["decode_graph"]
    got = {mode: run(static, mode) for mode in (True, False)}
    assert got == want
    # Each request decodes from under 48 keys to past them: both families served steps.
    decode_steps = runner.step_paths["decode_graph"] - steps_before
    assert 0 < runner.long_row_steps < decode_steps, (runner.long_row_steps, decode_steps)
    # Each family recorded its own bound (the CPU runs the long one's forward at its first replay).
    assert bounds[1] == bounds[2] == {47, runner.max_model_len}
    assert bounds[8] == {runner.max_model_len}
