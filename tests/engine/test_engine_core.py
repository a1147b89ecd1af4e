"""EngineCore behaviour on the real default model: preemption, prefix cache, n > 1, aborts, errors."""

from __future__ import annotations

import pytest

from appliance.engine.llm_engine import EngineCore
from appliance.engine.outputs import OutputAccumulator
from appliance.engine.sequence import SamplingParams
from appliance.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError, PromptTooLongError

from .conftest import CHAT_PROMPTS, chat_ids, engine_config, run_to_completion


def assert_idle(engine) -> None:
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_kv_blocks_used == 0, "blocks leaked"
    engine.block_manager.check_invariants([])


def test_tiny_kv_budget_preempts_and_gives_the_same_tokens(engine, default_model_dir):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = {f"p{i}": (chat_ids(engine.tokenizer, p), params) for i, p in enumerate(CHAT_PROMPTS)}
    roomy = run_to_completion(engine, prompts)
    # 8 sequences of ~30-60 + 40 tokens need ~50 blocks of 16; give 16, one full sequence's worth.
    small = EngineCore(engine_config(default_model_dir, num_kv_blocks=16, max_model_len=256))
    tight = run_to_completion(small, prompts)
    assert small.stats().num_preemptions > 0
    for request_id in prompts:
        assert tight[request_id].outputs[0].token_ids == roomy[request_id].outputs[0].token_ids
    assert_idle(small)


def test_chunked_prefill_small_token_budget_gives_the_same_tokens(engine, default_model_dir):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = {f"c{i}": (chat_ids(engine.tokenizer, p), params) for i, p in enumerate(CHAT_PROMPTS[:4])}
    reference = run_to_completion(engine, prompts)
    chunky = EngineCore(engine_config(default_model_dir, max_num_batched_tokens=7, num_kv_blocks=64))
    chunked = run_to_completion(chunky, prompts)
    for request_id in prompts:
        assert chunked[request_id].outputs[0].token_ids == reference[request_id].outputs[0].token_ids


def test_prefix_hits_reuse_blocks_and_match_a_cold_run(engine):
    system = "You are a meticulous assistant who answers in full sentences. " * 4
    ids = chat_ids(engine.tokenizer, system + "What is two plus two?")
    params = SamplingParams(max_tokens=16, temperature=0.0)
    before = engine.stats()
    cold = run_to_completion(engine, {"cold": (ids, params)})["cold"]
    warm = run_to_completion(engine, {"warm": (ids, params)})["warm"]
    after = engine.stats()
    assert warm.num_cached_tokens >= (len(ids) // 16 - 1) * 16 > 0
    assert after.prefix_cache_hits - before.prefix_cache_hits >= warm.num_cached_tokens
    assert warm.outputs[0].token_ids == cold.outputs[0].token_ids
    assert_idle(engine)


def test_a_burst_sharing_a_system_prompt_computes_it_once_and_matches_solo_runs(engine):
    # Added together, before any step: the first prompt's blocks are hashed when it is scheduled,
    # and the other three read them in that same step (a step stores every row's K/V of a layer
    # before any row attends), so the shared system prompt is computed once, not four times.
    system = "You review pull requests for a storage engine; reply with one short paragraph. " * 6
    questions = ["Is fsync needed here?", "Why a write-ahead log?", "What is a torn page?", "Name one B-tree cost."]
    prompts = {f"q{i}": (chat_ids(engine.tokenizer, system + q), SamplingParams(max_tokens=12, temperature=0.0))
               for i, q in enumerate(questions)}
    before = engine.stats()
    burst = run_to_completion(engine, prompts)
    after = engine.stats()
    shared_blocks = len(chat_ids(engine.tokenizer, system)) // 16 - 1
    assert shared_blocks >= 4
    assert after.prefix_cache_hits - before.prefix_cache_hits >= 3 * shared_blocks * 16
    assert all(burst[k].num_cached_tokens >= shared_blocks * 16 for k in ("q1", "q2", "q3"))
    for key, request in prompts.items():  # one at a time, each from the cache the burst left
        solo = run_to_completion(engine, {key: request})[key]
        assert solo.outputs[0].token_ids == burst[key].outputs[0].token_ids, key
    assert_idle(engine)


def test_n_greater_than_one_shares_the_prompt_blocks(engine):
    ids = chat_ids(engine.tokenizer, "Give me a random animal name.")
    params = SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    engine.add_request("fork", ids, params)
    acc = OutputAccumulator("fork", ids, keep_all=True)
    while len(engine.requests["fork"].seqs) < 4:
        for delta in engine.step():  # prefill + first tokens, then forks (one step later with async)
            acc.add(delta)
    seqs = engine.requests["fork"].seqs
    assert len(seqs) == 4
    full_prompt_blocks = len(ids) // 16
    shared = set(seqs[0].block_table[:full_prompt_blocks])
    for s in seqs[1:]:
        assert set(s.block_table[:full_prompt_blocks]) == shared
    while not acc.finished:
        for delta in engine.step():
            assert delta.request_id == "fork"
            acc.add(delta)
    final = acc.output()
    assert [c.index for c in final.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in final.outputs)
    assert len({tuple(c.token_ids) for c in final.outputs}) > 1, "4 samples at temperature 1 were identical"
    assert_idle(engine)
    # The seed makes the whole request reproducible.
    again = run_to_completion(engine, {"fork2": (ids, params)})["fork2"]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in final.outputs]


def test_seeded_sampling_is_reproducible_across_batch_compositions(engine):
    ids = chat_ids(engine.tokenizer, "Write a sentence about cats.")
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run_to_completion(engine, {"s": (ids, params)})["s"].outputs[0].token_ids
    others = {f"o{i}": (chat_ids(engine.tokenizer, p), SamplingParams(max_tokens=10, temperature=1.0))
              for i, p in enumerate(CHAT_PROMPTS[:5])}
    others["s2"] = (ids, params)
    mixed = run_to_completion(engine, others)["s2"].outputs[0].token_ids
    assert alone == mixed


def test_stop_string_cuts_exactly(engine):
    ids = chat_ids(engine.tokenizer, "What is the capital of France?")
    free = run_to_completion(engine, {"free": (ids, SamplingParams(max_tokens=32, temperature=0.0))})
    text = free["free"].outputs[0].text
    assert "Paris" in text
    stop = "Paris"
    cut = run_to_completion(engine, {"cut": (ids, SamplingParams(max_tokens=32, temperature=0.0, stop=[stop]))})
    choice = cut["cut"].outputs[0]
    assert choice.text == text[: text.index(stop)]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop


def test_abort_mid_generation_frees_every_block(engine):
    ids = chat_ids(engine.tokenizer, "Write a long essay about rivers.")
    engine.add_request("ab", ids, SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_kv_blocks_used > 0
    engine.abort("ab")
    assert not engine.has_unfinished_requests()
    assert_idle(engine)


def test_bad_input_raises_typed_errors(engine, tmp_path):
    with pytest.raises(PromptTooLongError, match="maximum context length"):
        engine.add_request("long", [1] * engine.max_model_len, SamplingParams())
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("mt", [1, 2, 3], SamplingParams(max_tokens=0))
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        engine.add_request("mt2", [1, 2, 3], SamplingParams(max_tokens=-5))
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    assert not engine.has_unfinished_requests()
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        EngineCore(engine_config(tmp_path / "no-such-model"))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(ModelLoadError):
        EngineCore(engine_config(corrupt))


def test_stop_token_id_ends_the_output_and_its_text_is_left_out(engine):
    ids = chat_ids(engine.tokenizer, "What is the capital of France?")
    free = run_to_completion(engine, {"free-tok": (ids, SamplingParams(max_tokens=32, temperature=0.0))})
    tokens = free["free-tok"].outputs[0].token_ids
    stop_at = 3  # a plain word token in the middle of the answer
    stop_id = tokens[stop_at]
    assert stop_id not in tokens[:stop_at]
    cut = run_to_completion(engine, {"cut-tok": (ids, SamplingParams(max_tokens=32, temperature=0.0,
                                                                      stop_token_ids=[stop_id]))})
    choice = cut["cut-tok"].outputs[0]
    assert choice.token_ids == tokens[: stop_at + 1]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop_id
    assert choice.text == engine.tokenizer.decode(tokens[:stop_at], skip_special_tokens=True)


def test_the_cuda_warmup_runs_the_steps_no_graph_serves_and_leaves_the_engine_idle(default_model_dir):
    """EngineCore.warmup on CUDA also runs, through the normal path, a lone prompt longer than the
    largest prefill graph, a multi-prompt prefill and a mixed decode+prefill step (their Triton
    kernels compile at start-up, not in a user's request). The same sequence on the CPU core: the
    steps it makes are those, and it leaves nothing behind."""
    import dataclasses

    from appliance.engine.llm_engine import EngineCore

    config = dataclasses.replace(engine_config(default_model_dir, max_num_batched_tokens=256),
                                 cuda_graph_prefill_max_tokens=32)
    core = EngineCore(config)
    steps = _record_steps(core)
    core._warmup_eager_steps(core.eos_token_ids[0])
    assert [32 + config.cache.block_size + 1] in steps  # the lone prompt past the largest graph, in one step
    assert any(sum(1 for n in step if n > 1) >= 2 for step in steps)  # two prefills in one step
    assert any(1 in step and any(n > 1 for n in step) for step in steps)  # decodes and a prefill
    assert not core.requests and not core.has_unfinished_requests()
    assert_idle(core)


def test_a_prompt_token_cap_in_decoding_steps_keeps_the_tokens_and_bounds_each_step(engine, default_model_dir):
    """scheduler.max_prefill_tokens_with_decodes: prompts that arrive while others decode are
    prefilled at most N tokens per step; greedy outputs are the same as without the cap."""
    from appliance.engine.llm_engine import EngineCore

    cap = 8
    capped = EngineCore(engine_config(default_model_dir, max_prefill_tokens_with_decodes=cap))
    steps = _record_steps(capped)
    from appliance.engine.outputs import OutputAccumulator

    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    late = {f"late{i}": (chat_ids(capped.tokenizer, CHAT_PROMPTS[i]), params) for i in (3, 6)}
    assert min(len(ids) for ids, _ in late.values()) > 3 * cap  # several chunks each
    accs = {"a": OutputAccumulator("a", keep_all=True)}
    capped.add_request("a", chat_ids(capped.tokenizer, CHAT_PROMPTS[0]), params)
    for _ in range(3):  # "a" is decoding now
        for delta in capped.step():
            accs[delta.request_id].add(delta)
    for rid, (ids, p) in late.items():
        capped.add_request(rid, ids, p)
        accs[rid] = OutputAccumulator(rid, ids, keep_all=True)
    while capped.has_unfinished_requests():
        for delta in capped.step():
            accs[delta.request_id].add(delta)
    mixed = [s for s in steps if 1 in s and any(n > 1 for n in s)]
    assert mixed, steps  # the late prompts were prefilled beside a decode
    assert all(sum(n for n in s if n > 1) <= cap for s in mixed), mixed
    reference = run_to_completion(engine, late)
    for key in late:
        assert accs[key].output().outputs[0].token_ids == reference[key].outputs[0].token_ids, key
        assert len(reference[key].outputs[0].token_ids) == 10
    assert_idle(capped)


def _record_steps(core) -> list[list[int]]:
    """Each launched step's rows, as their numbers of new tokens (the real launch runs)."""
    steps: list[list[int]] = []
    launch = core.runner.launch

    def recording(out, *args, **kwargs):
        steps.append([item.num_new_tokens for item in out.scheduled])
        return launch(out, *args, **kwargs)

    core.runner.launch = recording
    return steps
