"""Async scheduling gives exactly the tokens of the synchronous loop (real default model, CPU).

Each scenario runs the same requests through two engines that differ only in
`EngineConfig.async_scheduling`, and compares every choice's tokens, text, finish and stop reason
and logprobs. The engine's own asserts check the invariants on the way (placeholders never
hashed, never fed except from the device, never re-prefilled).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from appliance.engine.llm_engine import EngineCore
from appliance.engine.outputs import OutputAccumulator, RequestOutput
from appliance.engine.sequence import PLACEHOLDER_TOKEN_ID, SamplingParams

from .conftest import CHAT_PROMPTS, chat_ids, engine_config

Requests = dict[str, tuple[list[int], SamplingParams]]


def make_engine(model_dir: Path, async_scheduling: bool, **overrides: object) -> EngineCore:
    config = engine_config(model_dir, **overrides)
    return EngineCore(dataclasses.replace(config, async_scheduling=async_scheduling))


@pytest.fixture(scope="module")
def engines(default_model_dir: Path) -> dict[bool, EngineCore]:
    return {flag: make_engine(default_model_dir, flag, num_kv_blocks=64, max_model_len=256) for flag in (False, True)}


def mixed_requests(tokenizer) -> Requests:
    """Greedy, a stop string, seeded top-p, seeded n=3, penalties (the async path waits) and logprobs."""
    ids = [chat_ids(tokenizer, p) for p in CHAT_PROMPTS]
    return {
        "greedy": (ids[1], SamplingParams(max_tokens=10, temperature=0.0)),
        "stop": (ids[0], SamplingParams(max_tokens=16, temperature=0.0, stop=["Paris"])),
        "seeded": (ids[3], SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=11)),
        "n3": (ids[7], SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5, ignore_eos=True)),
        "penalty": (ids[4], SamplingParams(max_tokens=8, temperature=0.0, repetition_penalty=1.4)),
        "logprobs": (ids[5], SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)),
    }


def summary(out: RequestOutput) -> list[tuple]:
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
             [(lp.token_id, [t for t, _ in lp.top]) for lp in c.logprobs or []]) for c in out.outputs]


def run(engine: EngineCore, requests: Requests, abort_after: dict[str, int] | None = None) -> dict[str, list]:
    """Step until the engine drains; abort request r after abort_after[r] steps. Checks that no
    output ever carries a placeholder and that the engine ends idle with every block free."""
    accumulators = {}
    for request_id, (ids, params) in requests.items():
        engine.add_request(request_id, ids, params)
        accumulators[request_id] = OutputAccumulator(request_id, ids, keep_all=True)
    final: dict[str, list] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for choice in delta.outputs:
                assert PLACEHOLDER_TOKEN_ID not in choice.token_ids
                assert len(choice.token_ids) == 1, "one new token per choice per step"
            acc = accumulators[delta.request_id]
            acc.add(delta)
            if delta.finished:
                final[delta.request_id] = summary(acc.output())
        steps += 1
        for request_id, after in (abort_after or {}).items():
            if steps == after:
                engine.abort(request_id)
                final[request_id] = ["aborted"]
    assert final.keys() == requests.keys()
    stats = engine.stats()
    assert stats.num_running == stats.num_waiting == stats.num_kv_blocks_used == 0
    engine.block_manager.check_invariants([])
    return final


def test_mixed_batch_gives_the_same_outputs(engines):
    requests = mixed_requests(engines[False].tokenizer)
    sync = run(engines[False], requests)
    assert sync["stop"][0][2:4] == ("stop", "Paris"), "the stop string must end a request"
    assert len({tuple(c[0]) for c in sync["n3"]}) > 1
    assert run(engines[True], requests) == sync


def test_abort_while_in_flight_leaves_the_others_unchanged(engines):
    tokenizer = engines[False].tokenizer
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    requests = {f"a{i}": (chat_ids(tokenizer, p), params) for i, p in enumerate(CHAT_PROMPTS[:3])}
    abort_after = {"a1": 3}
    sync = run(engines[False], requests, abort_after)
    assert run(engines[True], requests, abort_after) == sync

    # Aborting the only request while its step is in flight leaves nothing to step.
    engine = engines[True]
    engine.add_request("alone", requests["a0"][0], params)
    engine.step()
    engine.step()
    assert engine.has_unfinished_requests()
    engine.abort("alone")
    assert not engine.has_unfinished_requests()
    assert engine.stats().num_kv_blocks_used == 0


def test_preemption_gives_the_same_outputs(default_model_dir, engines):
    # 7 blocks of 16 tokens: three ~40-token prompts (sharing the chat template's first block, hashed
    # when scheduled) growing by 12 cannot all stay resident.
    requests = {
        "g0": (chat_ids(engines[False].tokenizer, CHAT_PROMPTS[3]),
               SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
        "g1": (chat_ids(engines[False].tokenizer, CHAT_PROMPTS[6]),
               SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)),
        "n3": (chat_ids(engines[False].tokenizer, CHAT_PROMPTS[1]),
               SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)),
    }
    roomy = run(engines[False], requests)
    tight = make_engine(default_model_dir, True, num_kv_blocks=7, max_model_len=128)
    assert run(tight, requests) == roomy
    assert tight.stats().num_preemptions > 0


def tiny_engine(model_dir: Path, async_scheduling: bool, num_blocks: int, budget: int) -> EngineCore:
    from appliance.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

    return EngineCore(EngineConfig(
        model=ModelConfig(model="tiny-llama", load_format="dummy", tokenizer=str(model_dir),
                          device="cpu", dtype="float32"),
        cache=CacheConfig(num_kv_blocks=num_blocks, block_size=4),
        scheduler=SchedulerConfig(max_model_len=num_blocks * 4, max_num_seqs=8, max_num_batched_tokens=budget),
        async_scheduling=async_scheduling))


@pytest.mark.parametrize("seed", [2, 14])
def test_tiny_cache_interleavings_give_the_same_outputs(default_model_dir, seed):
    """Random n=1/n=3 seeded requests in a cache of 6-11 blocks of 4 tokens: constant preemption,
    forks from a parent preempted before its first tokens arrived (seed 2 and 14, at writing)."""
    import random

    rng = random.Random(seed)
    requests: Requests = {}
    for i in range(5):
        n = rng.choice([1, 3])
        ids = [rng.randrange(100, 40000) for _ in range(rng.randrange(3, 14))]
        requests[f"r{i}"] = (ids, SamplingParams(n=n, max_tokens=rng.randrange(2, 10), temperature=1.0,
                                                 seed=rng.randrange(100), ignore_eos=True))
    num_blocks, budget = rng.randrange(6, 12), rng.choice([8, 16, 64])
    sync = run(tiny_engine(default_model_dir, False, num_blocks, budget), requests)
    assert run(tiny_engine(default_model_dir, True, num_blocks, budget), requests) == sync
