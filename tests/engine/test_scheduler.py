"""Scheduler and block manager: exact behaviour on small hand-built cases (no torch, no model)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from appliance.engine.block_manager import BlockManager
from appliance.engine.scheduler import Scheduler
from appliance.engine.sequence import FinishReason, SamplingParams, Sequence


def make(num_blocks: int = 16, block_size: int = 4, budget: int = 16, max_seqs: int = 8,
         prefix: bool = True) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix)
    return Scheduler(bm, max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=64)


def seq(n: int, start: int = 100, rid: str = "r") -> Sequence:
    return Sequence(rid, list(range(start, start + n)), SamplingParams(max_tokens=32))


@dataclass
class Sampled:
    token_ids: list[int]
    logprobs: None = None


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    s.after_launch(out)
    s.update_from_output(out, {item.seq.seq_id: Sampled([token]) for item in out.scheduled if item.sample})
    return out


def test_scheduler_imports_no_torch():
    import appliance.engine.block_manager  # noqa: F401
    import appliance.engine.scheduler  # noqa: F401

    code = "import sys, appliance.engine.scheduler; sys.exit('torch' in sys.modules)"
    import subprocess

    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_chunked_prefill_splits_a_long_prompt_under_the_token_budget():
    s = make(budget=8)
    a = seq(20)
    s.add(a)
    chunks = [step(s).scheduled[0].num_new_tokens for _ in range(3)]
    assert chunks == [8, 8, 4]
    assert a.num_computed_tokens == 20 and len(a) == 21  # sampled after the last chunk only


def test_decodes_go_first_and_prefill_takes_the_rest_of_the_budget():
    s = make(budget=8)
    a, b = seq(3, rid="a"), seq(30, 200, rid="b")
    s.add(a)
    step(s)  # a prefilled
    s.add(b)
    out = step(s)
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 7)]
    assert out.num_batched_tokens == 8


def test_max_num_seqs_and_fcfs():
    s = make(max_seqs=2, budget=64)
    seqs = [seq(3, 10 * i, rid=f"r{i}") for i in range(4)]
    for x in seqs:
        s.add(x)
    out = step(s)
    assert [i.seq.request_id for i in out.scheduled] == ["r0", "r1"]
    s.finish(seqs[0], FinishReason.STOP)
    out = step(s)
    assert [i.seq.request_id for i in out.scheduled] == ["r1", "r2"]


def test_out_of_blocks_preempts_the_newest_and_recomputes_later():
    s = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq(7, rid="a"), seq(7, 300, rid="b")
    s.add(a)
    s.add(b)
    step(s)  # both prefilled (positions 0..6) and sampled token 7: 2 blocks each, pool empty
    assert s.block_manager.num_allocatable == 0
    assert not step(s).preempted  # position 7 still fits the second block
    out = step(s)  # position 8 needs a third block for both: b (newest) is preempted
    assert [x.request_id for x in out.preempted] == ["b"]
    assert [i.seq.request_id for i in out.scheduled] == ["a"]
    assert b.block_table == [] and s.waiting[0] is b
    s.finish(a, FinishReason.STOP)
    out = step(s)
    # Recompute: whatever of b's prefix survived in the cache is reused (a took one of its freed
    # blocks), the rest is computed again in one prefill.
    assert out.scheduled[0].seq is b and b.num_cached_tokens == 4
    assert out.scheduled[0].num_new_tokens == len(b) - 4 - 1 and out.scheduled[0].sample
    s.block_manager.check_invariants([b.block_table])


def test_prefix_hit_reuses_committed_blocks_and_leaves_the_last_token_to_compute():
    s = make(block_size=4)
    a = seq(12, rid="a")
    s.add(a)
    step(s)
    s.finish(a, FinishReason.STOP)
    usage = s.block_manager.usage()
    assert usage.num_cached_free == 3 and usage.num_used == 0
    b = seq(12, rid="b")
    s.add(b)
    out = step(s)
    # 12 tokens = 3 full blocks, but the last token must be computed: 2 blocks hit.
    assert b.num_cached_tokens == 8 and out.scheduled[0].num_new_tokens == 4
    s.block_manager.check_invariants([b.block_table])


def test_a_burst_sharing_a_prompt_prefix_computes_it_once_in_the_same_step():
    # Four prompts with one 8-token system prompt (2 blocks) arrive together: the first one's
    # prompt blocks are hashed when scheduled, so the others hit them in the same step (the step
    # writes every row's K/V before any row attends) and compute only their own tokens.
    s = make(num_blocks=32, block_size=4, budget=64)
    system = list(range(500, 508))
    burst = [Sequence(f"r{i}", system + [600 + 10 * i, 601 + 10 * i, 602 + 10 * i], SamplingParams(max_tokens=4))
             for i in range(4)]
    for q in burst:
        s.add(q)
    out = step(s)
    assert [item.num_new_tokens for item in out.scheduled] == [11, 3, 3, 3]
    assert [q.num_cached_tokens for q in burst] == [0, 8, 8, 8]
    assert all(q.block_table[:2] == burst[0].block_table[:2] for q in burst)
    assert s.block_manager.blocks[burst[0].block_table[0]].ref_count == 4
    s.block_manager.check_invariants([q.block_table for q in burst])


def test_a_prefill_chunk_hashes_only_the_prompt_blocks_it_covers():
    s = make(num_blocks=32, block_size=4, budget=6)
    a = seq(14, rid="a")
    s.add(a)
    s.schedule()  # positions 0..5: block 0 full, block 1 half
    assert a.num_hashed_blocks == 1
    b = seq(14, rid="b")
    s.add(b)
    out = s.schedule()  # a's next chunk (6..11) fills blocks 1 and 2; b waits for budget
    assert a.num_hashed_blocks == 3 and [item.seq for item in out.scheduled] == [a]


def test_fork_copies_the_shared_partial_block_on_write():
    bm = BlockManager(8, 4)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    parent = seq(6)
    s.add(parent)
    step(s)  # 6 prompt tokens computed, 1 sampled: tokens 0..6 in blocks [b0, b1]
    child = Sequence("r", parent.prompt_token_ids, parent.sampling_params, index=1)
    child.token_ids = parent.token_ids[:-1] + [9]
    bm.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    s.add_running(child)
    out = step(s)
    assert len(out.blocks_to_copy) == 1  # the second (partial) block, written by one of the two
    src, dst = out.blocks_to_copy[0]
    assert parent.block_table[0] == child.block_table[0]  # the full block stays shared
    assert {parent.block_table[1], child.block_table[1]} == {src, dst}
    bm.check_invariants([parent.block_table, child.block_table])
