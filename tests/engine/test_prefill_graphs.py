"""A lone prefill through the static, padded inputs that the CUDA prefill graphs replay.

On CUDA such steps replay a graph captured per token count; here (CPU) the same static buffers
run eagerly (`_setup_prefill_graphs(capture=False)`), so the padding, the one-copy upload, the
logits row and the block table of this path are checked against plain eager steps: lone requests,
chunked lone prefills that sample nothing, and prefills that start after a prefix-cache hit.
(tests/engine/test_gpu_engine.py replays the captured graphs themselves on a GPU.)
"""

from __future__ import annotations

from appliance.engine.llm_engine import EngineCore
from appliance.engine.sequence import SamplingParams

from .conftest import CHAT_PROMPTS, chat_ids, engine_config, run_to_completion


def _one_at_a_time(engine: EngineCore, prompts: dict[str, list[int]], max_tokens: int) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return {rid: run_to_completion(engine, {rid: (ids, params)})[rid].outputs[0].token_ids
            for rid, ids in prompts.items()}


def _with_static_prefill(engine: EngineCore) -> list[int]:
    """Route lone prefills through the static path; returns the token counts it served."""
    runner = engine.runner
    runner._setup_prefill_graphs(capture=False)
    served: list[int] = []
    replay = runner._replay_prefill

    def counting(hb, size):
        served.append(len(hb.ids))
        assert size >= len(hb.ids) and size in runner.prefill_graphs
        return replay(hb, size)

    runner._replay_prefill = counting
    return served


def test_lone_prefills_match_eager_steps(engine, default_model_dir):
    prompts = {f"p{i}": chat_ids(engine.tokenizer, p) for i, p in enumerate(CHAT_PROMPTS[:4])}
    # Twice: the second round's prompts hit the prefix cache (the prefill starts past position 0).
    rounds = {**prompts, **{f"again{i}": ids for i, ids in enumerate(prompts.values())}}
    want = _one_at_a_time(EngineCore(engine_config(default_model_dir, max_num_batched_tokens=512)), rounds, 12)
    static = EngineCore(engine_config(default_model_dir, max_num_batched_tokens=512))
    served = _with_static_prefill(static)
    assert sorted(static.runner.prefill_graphs) == [16, 32, 64, 128, 256, 512]
    got = _one_at_a_time(static, rounds, 12)
    assert got == want
    assert len(served) == len(rounds), served  # every prompt's prefill took the static path
    assert static.stats().prefix_cache_hits > 0


def test_chunked_lone_prefill_matches_eager_steps(engine, default_model_dir):
    long_prompt = chat_ids(engine.tokenizer, " ".join(CHAT_PROMPTS))
    assert len(long_prompt) > 100
    prompts = {"long": long_prompt, "short": chat_ids(engine.tokenizer, CHAT_PROMPTS[2])}
    want = _one_at_a_time(EngineCore(engine_config(default_model_dir, max_num_batched_tokens=48)), prompts, 8)
    static = EngineCore(engine_config(default_model_dir, max_num_batched_tokens=48))
    served = _with_static_prefill(static)
    assert sorted(static.runner.prefill_graphs) == [16, 32, 48]
    got = _one_at_a_time(static, prompts, 8)
    assert got == want
    assert served.count(48) >= 2, served  # whole chunks that sample nothing, then the remainder


def test_lone_prefill_graphs_can_be_turned_off(default_model_dir):
    import dataclasses

    config = engine_config(default_model_dir)
    engine = EngineCore(dataclasses.replace(config, cuda_graph_prefill_max_tokens=0))
    engine.runner._setup_prefill_graphs(capture=False)
    assert engine.runner.prefill_graphs == {}
