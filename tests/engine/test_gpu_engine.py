"""CUDA only: the engine with CUDA graphs and async scheduling against eager, synchronous steps.

Decode steps replay graphs captured at padded batch sizes, fed by one host->device copy into
persistent inputs and by the in-flight step's sampled ids (placeholders); lone prefills replay
prefill graphs; mixed steps run eagerly, or through piecewise graphs when they are turned on. A
tiny dummy Llama in float32 (exact dot products in the kernels) must give
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


def _engine(graphs: bool, max_num_batched_tokens: int = 256, piecewise: int = 0) -> EngineCore:
    config = EngineConfig(
        model=ModelConfig(model="tiny-llama", load_format="dummy", device="cuda", dtype="float32", seed=3),
        cache=CacheConfig(num_kv_blocks=512),
        scheduler=SchedulerConfig(max_model_len=256, max_num_seqs=24, max_num_batched_tokens=max_num_batched_tokens),
        enforce_eager=not graphs,
        async_scheduling=graphs,
        cuda_graph_piecewise_max_tokens=piecewise,
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


def test_long_row_graphs_match_eager_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small decode batches get a second graph for rows past LONG_ROW_KEYS (more split-KV
    partitions: kernels/attention.py); lowered to 48 keys here, so `_run`'s rows cross it and
    partitions run empty. Both families must give the eager, synchronous tokens."""
    from appliance_kernels import attention

    monkeypatch.setattr(attention, "LONG_ROW_KEYS", 48)
    monkeypatch.setattr(attention, "_MIN_KEYS_PER_SPLIT", 1)
    graphs = _engine(graphs=True)
    assert graphs.runner.long_graphs and set(graphs.runner.long_graphs) <= set(graphs.runner.graphs)
    want = _run(_engine(graphs=False))
    got = _run(graphs)
    assert graphs.runner.long_row_steps > 0
    assert graphs.runner.step_paths["decode_graph"] > graphs.runner.long_row_steps
    diverged = [(r, want[r], got[r]) for r in want if got[r] != want[r]]
    assert len(want) == 40 and not diverged, diverged[:3]


def test_piecewise_graphs_match_eager_sync() -> None:
    """The mixed and multi-prompt steps of `_run` replay the pieces cut at attention (padded token
    counts, attention launched between them) and give the eager, synchronous tokens."""
    graphs = _engine(graphs=True, piecewise=256)
    assert sorted(graphs.runner.piecewise) == [16, 32, 64, 128, 256]
    assert all(len(pw.pieces) == graphs.runner.model.num_layers + 1 for pw in graphs.runner.piecewise.values())
    want = _run(_engine(graphs=False))
    got = _run(graphs)
    assert graphs.runner.piecewise_steps > 5
    assert graphs.runner.step_paths["piecewise_graphs"] == graphs.runner.piecewise_steps
    assert graphs.runner.step_paths["decode_graph"] > 0
    diverged = [(r, want[r], got[r]) for r in want if got[r] != want[r]]
    assert len(want) == 40 and not diverged, diverged[:3]


def _run_alone(engine: EngineCore) -> dict[str, list[int]]:
    """Requests one at a time: each prompt is a lone prefill (a prefill graph when captured), in
    chunks that sample nothing when it is longer than the step's token budget."""
    rng = random.Random(11)
    vocab = engine.vocab_size
    done: dict[str, list[int]] = {}
    for i in range(12):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(2, 200))]
        engine.add_request(f"a{i}", prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        while engine.has_unfinished_requests():
            for delta in engine.step():
                done.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
    return done


def test_lone_prefill_graphs_match_eager() -> None:
    graphs = _engine(graphs=True, max_num_batched_tokens=64)
    assert sorted(graphs.runner.prefill_graphs) == [16, 32, 64]
    want = _run_alone(_engine(graphs=False, max_num_batched_tokens=64))
    got = _run_alone(graphs)
    assert len(want) == 12 and got == want


def _burst(engine: EngineCore) -> dict[str, list[int]]:
    """48 prompts with one 160-token system prompt, all added before the first step: the first
    one's prompt blocks are hashed when it is scheduled, and the rest of the step's prompts read
    them (the step stores every row's K/V of a layer before any row attends)."""
    rng = random.Random(11)
    vocab = engine.vocab_size
    system = [rng.randrange(vocab) for _ in range(160)]
    for i in range(48):
        engine.add_request(f"b{i}", system + [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))],
                           SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            done.setdefault(delta.request_id, []).extend(delta.outputs[0].token_ids)
    return done


def test_a_burst_reads_prompt_blocks_written_in_the_same_step() -> None:
    cached = _engine(graphs=True, max_num_batched_tokens=1024)
    stats_before = cached.block_manager.usage().prefix_hits_tokens
    got = _burst(cached)
    # The first step holds the first prompt whole and then others that hit its 10 blocks.
    assert cached.block_manager.usage().prefix_hits_tokens - stats_before >= 40 * 160
    cold = _engine(graphs=False, max_num_batched_tokens=1024)
    cold.block_manager.enable_prefix_caching = False
    assert got == _burst(cold)


def test_the_warmup_runs_the_steps_no_graph_serves_and_leaves_the_engine_serving() -> None:
    """EngineCore.warmup on CUDA: the short request, then a lone prompt past the largest prefill
    graph (eager), a two-prompt prefill and a mixed decode+prefill step, so their kernels compile
    before READY; after it the engine is idle, every block free, and serves a request."""
    config = EngineConfig(
        model=ModelConfig(model="tiny-llama", load_format="dummy", device="cuda", dtype="bfloat16", seed=3),
        cache=CacheConfig(num_kv_blocks=1024),
        scheduler=SchedulerConfig(max_model_len=1024, max_num_seqs=24, max_num_batched_tokens=1024),
        cuda_graph_prefill_max_tokens=256,
    )
    core = EngineCore(config, stream_outputs=False)
    steps: list[list[int]] = []
    launch = core.runner.launch

    def recording(out, *args, **kwargs):  # noqa: ANN001, ANN202 - the real launch, recorded
        steps.append([item.num_new_tokens for item in out.scheduled])
        return launch(out, *args, **kwargs)

    core.runner.launch = recording
    core.warmup()
    assert [256 + config.cache.block_size + 1] in steps
    assert any(1 in s and any(n > 1 for n in s) for s in steps)
    stats = core.stats()
    assert not core.has_unfinished_requests() and stats.num_kv_blocks_used == 0
    core.add_request("after", [5] * 10, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    deltas = []
    while core.has_unfinished_requests():
        deltas += core.step()
    assert deltas[-1].finished and len(deltas[-1].outputs[0].token_ids) == 4
