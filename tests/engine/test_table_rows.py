"""The model runner's persistent block-table rows against the plain zero-padded flattening.

The block manager changes tables (allocate, grow with copy-on-write, fork, sliding-window release,
free) and bumps each sequence's `table_version`; the runner rewrites a row only when another
sequence holds it or the version moved. Random traffic through a real BlockManager must give,
every step, exactly the tables a fresh flattening gives.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from appliance.engine.block_manager import BlockManager
from appliance.engine.model_runner import _TableRows
from appliance.engine.sequence import SamplingParams, Sequence


def _flat(seqs: list[Sequence]) -> np.ndarray:
    width = max(len(s.block_table) for s in seqs)
    return np.array([x for s in seqs for x in s.block_table + [0] * (width - len(s.block_table))], dtype=np.int32)


@pytest.mark.parametrize(("seed", "window"), [(0, None), (1, None), (2, 12), (3, 20)])
def test_rows_match_a_fresh_flattening_under_random_traffic(seed: int, window: int | None) -> None:
    rng = random.Random(seed)
    bm = BlockManager(400, 4, enable_prefix_caching=True, sliding_window=window)
    rows = _TableRows(max_blocks=40, rows=2)  # grows past 2 rows on the way
    live: list[Sequence] = []
    prefixes = [[rng.randrange(50) for _ in range(9)] for _ in range(3)]
    for _ in range(400):
        op = rng.random()
        if op < 0.25 and len(live) < 24:  # admit (prefix hits share blocks)
            seq = Sequence("r", rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 8))],
                           SamplingParams(max_tokens=64))
            bm.allocate(seq)
            seq.num_computed_tokens = len(seq.token_ids)
            bm.commit(seq)
            live.append(seq)
        elif op < 0.32 and live:  # fork (n > 1): the child shares every block
            parent = rng.choice(live)
            child = Sequence("r", parent.prompt_token_ids, parent.sampling_params, index=1)
            child.token_ids = list(parent.token_ids)
            bm.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            live.append(child)
        elif op < 0.42 and live:  # finish or preempt
            bm.free(live.pop(rng.randrange(len(live))))
        if not live:
            continue
        for seq in list(live):  # a decode step: one token each (copy-on-write of a shared last block)
            target = len(seq.token_ids) + 1
            if target > 120 or not bm.can_grow(seq, target):  # finished, or preempted
                bm.free(seq)
                live.remove(seq)
                continue
            seq.token_ids.append(rng.randrange(50))
            if not bm.covers(seq, target):
                bm.grow(seq, target)
            seq.num_computed_tokens = target
        if not live:
            continue
        if rng.random() < 0.3:
            rng.shuffle(live)  # rows change hands (admissions and finishes reorder a batch)
        order = rng.sample(live, rng.randrange(1, len(live) + 1))  # a step need not hold them all
        rows.reserve(len(order))
        for row, seq in enumerate(order):
            rows.set(row, seq)
        width = max(len(s.block_table) for s in order)
        assert np.array_equal(rows.take(len(order), width), _flat(order))
    bm.take_pending_copies()
