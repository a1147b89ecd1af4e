"""CUDA only: cascade attention through the engine's CUDA graphs (the second decode-graph family,
its static prefix buffer, prefix lengths that change between replays) against the engine with
cascade attention off. A tiny dummy Llama in float32 (exact dots in the kernels) must give the
same greedy tokens both ways on a burst of prompts that share a 272-token prefix (the first few
holding private copies of it) plus prompts that share nothing."""

from __future__ import annotations

import random

import pytest
import torch

from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from appliance.engine.llm_engine import EngineCore
from appliance.engine.sequence import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _engine(cascade: str) -> EngineCore:
    config = EngineConfig(
        model=ModelConfig(model="tiny-llama", load_format="dummy", device="cuda", dtype="float32", seed=3),
        cache=CacheConfig(num_kv_blocks=2048),
        scheduler=SchedulerConfig(max_model_len=512, max_num_seqs=160, max_num_batched_tokens=1024),
        cuda_graph_batch_sizes=(8, 16, 64, 96, 128, 160),
        cuda_graph_prefill_max_tokens=0,
        cascade_attention=cascade,
    )
    return EngineCore(config, stream_outputs=False)


def _run(engine: EngineCore) -> dict[str, list[int]]:
    rng = random.Random(5)
    vocab = engine.vocab_size
    shared = [rng.randrange(vocab) for _ in range(272)]
    prompts = {f"s{i}": shared + [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))] for i in range(130)}
    prompts |= {f"x{i}": [rng.randrange(vocab) for _ in range(rng.randrange(5, 300))] for i in range(10)}
    for request_id, prompt in prompts.items():
        max_tokens = rng.randrange(16, 48)  # the batch shrinks through several graph sizes
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            done.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
    return done


def test_cascade_graphs_match_plain_graphs() -> None:
    cascade = _engine("auto")
    runner = cascade.runner
    assert runner.cascade_min_seqs > 8 and sorted(runner.cascade_graphs) == [
        s for s in (8, 16, 64, 96, 128, 160) if s >= runner.cascade_min_seqs]
    got = _run(cascade)
    plain = _engine("off")
    assert not plain.runner.cascade_graphs
    want = _run(plain)
    assert runner.cascade_steps >= 3 and plain.runner.cascade_steps == 0
    assert got.keys() == want.keys() and len(want) == 140
    diverged = [(r, want[r], got[r]) for r in want if got[r] != want[r]]
    assert not diverged, diverged[:3]
