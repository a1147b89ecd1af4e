"""The step's common prefix (cascade attention's shared blocks): BlockManager.num_common_prefix_blocks
and SchedulerOutput.num_common_prefix_blocks under random traffic through the real scheduler.

Checked every step against brute force over the block tables: the count is sound (every scheduled
table starts with those blocks) and, when every running sequence is in the step, exact (the run
that every live table shares, finished ones waiting for the step in flight included)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from appliance.engine.block_manager import FREED_BLOCK, BlockManager
from appliance.engine.scheduler import Scheduler
from appliance.engine.sequence import FinishReason, SamplingParams, Sequence

BLOCK = 4


@dataclass
class Sampled:
    token_ids: list[int]
    logprobs: None = None


def _common_run(tables: list[list[int]]) -> int:
    num = 0
    while all(len(t) > num for t in tables) and len({t[num] for t in tables}) == 1 and tables[0][num] != FREED_BLOCK:
        num += 1
    return num


def _check(sched: Scheduler, out, min_seqs: int) -> int:
    scheduled = [item.seq for item in out.scheduled]
    decode_only = len(scheduled) == out.num_batched_tokens
    if len(scheduled) < min_seqs or not decode_only:
        assert out.num_common_prefix_blocks == 0
        return 0
    num = out.num_common_prefix_blocks
    tables = [s.block_table for s in scheduled]
    assert num <= _common_run(tables), "a block counted as shared that some scheduled table lacks"
    if len(sched.running) == len(scheduled):  # the count is the run every live table shares,
        # finished sequences whose blocks wait for the step in flight included
        live = [s.block_table for s in sched.running] + [s.block_table for s in sched.deferred_frees()]
        assert num == _common_run(live)
    return num


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_common_prefix_is_sound_and_exact_under_random_traffic(async_scheduling: bool, seed: int) -> None:
    rng = random.Random(seed)
    bm = BlockManager(96, BLOCK, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=12, max_num_batched_tokens=40, max_model_len=80,
                      async_scheduling=async_scheduling, common_prefix_min_seqs=2)
    prefix = [rng.randrange(1000) for _ in range(13)]  # 3 whole blocks and a bit
    live: list[Sequence] = []
    in_flight = None
    shared_steps = 0
    for step in range(120):
        if rng.random() < 0.3:
            n = rng.choice([1, 1, 1, 3])
            prompt = prefix + [rng.randrange(1000) for _ in range(rng.randrange(0, 6))] if rng.random() < 0.8 else \
                [rng.randrange(1000) for _ in range(rng.randrange(1, 12))]
            seq = Sequence(f"r{step}", prompt, SamplingParams(n=n, max_tokens=rng.randrange(2, 20), ignore_eos=True))
            live.append(seq)
            sched.add(seq)
        out = sched.schedule()
        shared_steps += _check(sched, out, 2) > 0
        sampled = {item.seq.seq_id: Sampled([rng.randrange(1000) for _ in range(1 + item.seq.pending_forks)])
                   for item in out.scheduled if item.sample}
        if rng.random() < 0.05 and live:  # a client goes away while the step runs
            sched.finish(rng.choice(live), FinishReason.ABORT)
        if async_scheduling:
            prev, in_flight = in_flight, (out, sampled)
            updates = sched.update_from_output(*prev) if prev is not None else []
            sched.after_launch(out)
        else:
            sched.after_launch(out)
            updates = sched.update_from_output(out, sampled)
        live += [u.seq for u in updates if u.forked]
        live = [s for s in live if not s.is_finished]
    assert shared_steps > 5, "the traffic should produce steps with a shared prefix"


def test_fork_and_prefix_hits_share_blocks_and_a_stranger_ends_it() -> None:
    bm = BlockManager(64, BLOCK, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, common_prefix_min_seqs=2)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    first = Sequence("a", list(range(10)), params)
    sched.add(first)
    out = sched.schedule()
    sched.after_launch(out)
    sched.update_from_output(out, {first.seq_id: Sampled([77])})
    for rid in "bc":  # prefix hits on the first sequence's two whole blocks
        sched.add(Sequence(rid, list(range(10)) + [50, 51], params))
    out = sched.schedule()
    assert out.num_common_prefix_blocks == 0  # a mixed step (two prefills): not computed
    sched.after_launch(out)
    sched.update_from_output(out, {item.seq.seq_id: Sampled([5]) for item in out.scheduled if item.sample})
    out = sched.schedule()
    assert len(out.scheduled) == 3 and out.num_common_prefix_blocks == 2
    assert len({tuple(item.seq.block_table[:2]) for item in out.scheduled}) == 1
    sched.after_launch(out)
    sched.update_from_output(out, {item.seq.seq_id: Sampled([5]) for item in out.scheduled})
    sched.add(Sequence("d", [900], params))  # shares nothing
    out = sched.schedule()
    sched.after_launch(out)
    sched.update_from_output(out, {item.seq.seq_id: Sampled([5]) for item in out.scheduled if item.sample})
    assert sched.schedule().num_common_prefix_blocks == 0


def test_off_by_default_and_below_the_batch_size() -> None:
    bm = BlockManager(16, BLOCK)
    seq = Sequence("a", list(range(9)), SamplingParams(max_tokens=4))
    seq.block_table = [0, 1, 2]
    for block_id in seq.block_table:
        bm.blocks[block_id].ref_count = 1
    assert bm.num_common_prefix_blocks(seq, 1) == 3
    assert bm.num_common_prefix_blocks(seq, 2) == 0
    seq.block_table[0] = FREED_BLOCK  # a sliding window released it: never shared
    assert bm.num_common_prefix_blocks(seq, 1) == 0
    sched = Scheduler(BlockManager(16, BLOCK), max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32)
    sched.add(Sequence("b", [1, 2, 3], SamplingParams(max_tokens=4)))
    out = sched.schedule()
    sched.after_launch(out)
    sched.update_from_output(out, {item.seq.seq_id: Sampled([5]) for item in out.scheduled})
    assert sched.schedule().num_common_prefix_blocks == 0  # common_prefix_min_seqs=0: never computed
