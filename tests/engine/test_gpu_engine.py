"""CUDA only: the engine with CUDA graphs and async scheduling against eager, synchronous steps.

Decode steps replay graphs captured at padded batch sizes, fed by one host->device copy into
persistent inputs and by the in-flight step's sampled ids (placeholders); prefill and mixed
steps run eagerly. A tiny dummy Llama in float32 (exact dot products in the kernels) must give
the same greedy tokens both ways while requests arrive, finish and shrink the batch through
several graph sizes.
"""

from __future__ import annotations

import random

import pytest
import torch

from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from appliance.engine.llm_engine import EngineCore
from appliance.engine.sequence import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _engine(graphs: bool) -> EngineCore:
    config = EngineConfig(
        model=ModelConfig(model="tiny-llama", load_format="dummy", device="cuda", dtype="float32", seed=3),
        cache=CacheConfig(num_kv_blocks=512),
        scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=24, max_num_batched_tokens=256),
        enforce_eager=not graphs,
        async_scheduling=graphs,
    )
    return EngineCore(config, stream_outputs=False)


def _run(engine: EngineCore) -> dict[str, list[int]]:
    rng = random.Random(7)
    vocab = engine.vocab_size
    pending = [(f"r{i}", [rng.randrange(vocab) for _ in range(rng.randrange(2, 60))], rng.randrange(1, 40))
               for i in range(40)]
    done: dict[str, list[int]] = {}
    steps = 0
    while pending or engine.has_unfinished_requests():
        # Arrivals in bursts between steps: mixed steps, then decode batches of changing size.
        if pending and steps % 5 == 0:
            for request_id, prompt, max_tokens in pending[:7]:
                engine.add_request(request_id, prompt,
                                   SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
            pending = pending[7:]
        for delta in engine.step():
            done.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
        steps += 1
    return done


def test_graphs_and_async_match_eager_sync() -> None:
    graphs = _engine(graphs=True)
    assert graphs.runner.graphs, "no CUDA graph was captured"
    want = _run(_engine(graphs=False))
    got = _run(graphs)
    assert len(want) == 40 and got.keys() == want.keys()
    diverged = [(r, want[r], got[r]) for r in want if got[r] != want[r]]
    assert not diverged, diverged[:3]
