"""engine.kv_cache_dtype = "fp8" on CPU (torch references) with the real default model: caches of
float8 e4m3, a quarter of the fp32 bytes per block, and greedy text close to the fp32 cache's."""

from __future__ import annotations

import torch

from appliance.engine.llm_engine import EngineCore
from appliance.engine.sequence import SamplingParams

from .conftest import CHAT_PROMPTS, chat_ids, engine_config, run_to_completion


def test_fp8_kv_cache_generates_close_to_the_model_dtype_cache(engine, default_model_dir):
    fp8 = EngineCore(engine_config(default_model_dir, kv_cache_dtype="fp8", num_kv_blocks=128))
    runner = fp8.runner
    assert all(k.dtype == v.dtype == torch.float8_e4m3fn for k, v in runner.kv_caches)
    assert runner.kv_bytes_per_block * 4 == engine.runner.kv_bytes_per_block  # fp32 model: 4 bytes -> 1
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    prompts = {f"f{i}": (chat_ids(engine.tokenizer, p), params) for i, p in enumerate(CHAT_PROMPTS[:4])}
    want = run_to_completion(engine, prompts)
    got = run_to_completion(fp8, prompts)
    for request_id in prompts:
        ours, ref = got[request_id].outputs[0], want[request_id].outputs[0]
        # The first token comes from a prefill whose attention reads the fp8-rounded K/V it just
        # wrote: the same greedy choice, with a logprob within fp8 rounding of the fp32 one.
        assert ours.token_ids[0] == ref.token_ids[0]
        assert abs(ours.logprobs[0].logprob - ref.logprobs[0].logprob) < 0.5
    assert fp8.stats().num_kv_blocks_used == 0
