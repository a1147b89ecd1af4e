"""The step's shared prefix for cascade attention: BlockManager.common_prefix and
SchedulerOutput.common_prefix_blocks under random traffic through the real scheduler.

Checked every step: the prefix is a candidate's leading blocks, each listed by enough tables; every
scheduled row whose table lists its last block at the same index (how the model runner picks the
rows that share it) holds the same tokens there and writes its new token past it; hand-built cases
check which prefix is chosen."""

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


def _check(bm: BlockManager, out, min_seqs: int) -> int:
    """Returns how many scheduled rows share the step's prefix."""
    scheduled = [item.seq for item in out.scheduled]
    prefix = out.common_prefix_blocks
    if len(scheduled) < min_seqs or len(scheduled) != out.num_batched_tokens:
        assert prefix == []
        return 0
    if not prefix:
        return 0
    k = len(prefix)
    owner = next(s for s in (scheduled[0], scheduled[len(scheduled) // 2], scheduled[-1])
                 if s.block_table[:k] == prefix)
    assert all(bm.blocks[b].ref_count >= max(2, min_seqs) for b in prefix)
    sharing = 0
    for item in out.scheduled:
        table = item.seq.block_table
        if len(table) >= k and table[k - 1] == prefix[-1]:
            sharing += 1
            assert item.seq.token_ids[: k * BLOCK] == owner.token_ids[: k * BLOCK]
            assert item.start >= k * BLOCK, "a row writes into the shared prefix"
    return sharing


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
        shared_steps += _check(bm, out, 2) >= 2
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


def _step(sched: Scheduler, token: int = 5):
    out = sched.schedule()
    sampled = {item.seq.seq_id: Sampled([token] * (1 + item.seq.pending_forks)) for item in out.scheduled if item.sample}
    sched.after_launch(out)
    sched.update_from_output(out, sampled)
    return out


def test_prefix_hits_share_the_first_writers_blocks_even_in_its_own_step() -> None:
    bm = BlockManager(64, BLOCK, enable_prefix_caching=True)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64, common_prefix_min_seqs=2)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompt = list(range(10))  # two whole blocks and a bit
    # One step admits two: the second hits the first's prompt blocks, hashed when scheduled (the
    # step stores every row's K/V before any row attends).
    a, b = Sequence("a", prompt, params), Sequence("b", prompt + [60], params)
    sched.add(a)
    sched.add(b)
    out = _step(sched)
    assert a.block_table[:2] == b.block_table[:2] and b.num_cached_tokens == 2 * BLOCK
    assert [item.num_new_tokens for item in out.scheduled] == [10, 3]
    for rid in "cd":  # later ones hit the same blocks
        sched.add(Sequence(rid, prompt + [50, 51], params))
    assert _step(sched).common_prefix_blocks == []  # a mixed step: not looked for
    out = _step(sched)
    assert len(out.scheduled) == 4 and out.common_prefix_blocks == a.block_table[:2]
    assert _check(bm, out, 2) == 4
    sched.add(Sequence("e", [900], params))  # shares nothing
    _step(sched)
    out = _step(sched)
    assert out.common_prefix_blocks == a.block_table[:2] and _check(bm, out, 2) == 4


def test_the_prefix_that_saves_the_most_wins() -> None:
    """Three tables share one block, two of them three blocks: 2 x 3 > 3 x 1."""
    bm = BlockManager(16, BLOCK)
    tables = [[0, 1, 2, 3], [0, 1, 2, 4], [0, 5, 6]]
    seqs = []
    for table in tables:
        seq = Sequence("r", list(range(4 * len(table))), SamplingParams(max_tokens=4))
        seq.block_table = list(table)
        for block_id in table:
            bm.blocks[block_id].ref_count += 1
        seqs.append(seq)
    assert bm.common_prefix((seqs[2], seqs[0]), 2) == [0, 1, 2]
    assert bm.common_prefix((seqs[2],), 2) == [0]
    assert bm.common_prefix((seqs[0],), 3) == [0]  # blocks fewer tables list than asked for stop it
    assert bm.common_prefix((seqs[0],), 4) == []
    seqs[0].block_table[0] = FREED_BLOCK  # a sliding window released it: never shared
    assert bm.common_prefix((seqs[0],), 2) == []


def test_off_by_default() -> None:
    sched = Scheduler(BlockManager(16, BLOCK), max_num_seqs=4, max_num_batched_tokens=16, max_model_len=32)
    sched.add(Sequence("a", list(range(9)), SamplingParams(n=2, max_tokens=4)))
    _step(sched)  # the prompt's prefill; the second choice forks, sharing the prompt's blocks
    out = sched.schedule()
    assert len(out.scheduled) == 2 and out.scheduled[0].seq.block_table[:2] == out.scheduled[1].seq.block_table[:2]
    assert out.common_prefix_blocks == []  # common_prefix_min_seqs=0: never looked for
