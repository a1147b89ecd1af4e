"""Sliding windows in the block manager: blocks that fall out of every layer's window are released,
so a sequence's memory stays bounded by its window while it grows (no torch: a simulated cache
holds each position's token id, and every step checks that the window still reads back right)."""

from __future__ import annotations

import pytest

from appliance.engine.block_manager import FREED_BLOCK, BlockManager, kv_free_window
from appliance.engine.sequence import SamplingParams, Sequence

BLOCK_SIZE = 4


class SimulatedCache:
    """Each slot holds the token id written there (None: never written)."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.slots: list[list[int | None]] = [[None] * BLOCK_SIZE for _ in range(bm.num_blocks)]

    def step(self, seq: Sequence, num_new: int) -> None:
        """Schedule num_new tokens (grow), 'compute' them (write their slots), then commit."""
        target = seq.num_computed_tokens + num_new
        assert self.bm.can_grow(seq, target)
        self.bm.grow(seq, target)
        for pos in range(seq.num_computed_tokens, target):
            block = seq.block_table[pos // BLOCK_SIZE]
            assert block != FREED_BLOCK, "a position being written has no block"
            self.slots[block][pos % BLOCK_SIZE] = seq.token_ids[pos]
        seq.num_computed_tokens = target
        self.bm.commit(seq)

    def window_reads_back(self, seq: Sequence, window: int) -> bool:
        """Every key the next query (at num_computed_tokens) can see holds its token."""
        first = max(0, seq.num_computed_tokens - window + 1)
        for pos in range(first, seq.num_computed_tokens):
            block = seq.block_table[pos // BLOCK_SIZE]
            if block == FREED_BLOCK or self.slots[block][pos % BLOCK_SIZE] != seq.token_ids[pos]:
                return False
        return True


def grow_by_decoding(bm: BlockManager, prompt: list[int], total: int, window: int) -> tuple[Sequence, int]:
    """Prefill `prompt` in chunks of 8, then decode to `total` tokens; returns the sequence and the
    most blocks it held at once while decoding.

    NOTE: this simulation admits the whole prompt at once; its chunks then release blocks as the
    window passes. The scheduler passes its step budget to `allocate`, so admission in the engine
    takes only the cached prefix and the first chunk."""
    cache = SimulatedCache(bm)
    seq = Sequence("r", prompt, SamplingParams())
    bm.allocate(seq)
    most_held = 0
    while seq.num_computed_tokens < len(seq.token_ids):
        cache.step(seq, min(8, len(seq.token_ids) - seq.num_computed_tokens))
    while len(seq.token_ids) < total:
        seq.append_token(1000 + len(seq.token_ids))
        cache.step(seq, 1)
        most_held = max(most_held, bm.usage().num_used)
        assert cache.window_reads_back(seq, window)
        bm.check_invariants([seq.block_table])
        released = [i for i, b in enumerate(seq.block_table) if b == FREED_BLOCK]
        assert released == list(range(len(released))), "released entries form a prefix of the table"
    return seq, most_held


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_window_bounds_the_blocks_a_growing_sequence_holds(prefix_caching: bool) -> None:
    window = 10
    bm = BlockManager(64, BLOCK_SIZE, prefix_caching, sliding_window=window)
    seq, most_held = grow_by_decoding(bm, list(range(30)), 200, window)
    # The window spans at most ceil((window - 1) / bs) + 1 blocks; one more is the block being
    # filled, and prefix caching keeps the newest hashed block as the next hash's parent.
    assert most_held <= -(-(window - 1) // BLOCK_SIZE) + 2 + (1 if prefix_caching else 0)
    assert len(seq.block_table) == 50  # 200 positions still map to 50 table entries
    assert seq.block_table.count(FREED_BLOCK) >= 45
    bm.free(seq)
    bm.check_invariants([])
    assert bm.usage().num_used == 0


def test_without_a_window_every_block_is_kept() -> None:
    bm = BlockManager(64, BLOCK_SIZE, False, sliding_window=None)
    seq, most_held = grow_by_decoding(bm, list(range(30)), 120, window=10**9)
    assert FREED_BLOCK not in seq.block_table and most_held == 30


def test_released_hashed_blocks_still_serve_a_later_prompt_from_the_prefix_cache() -> None:
    bm = BlockManager(64, BLOCK_SIZE, True, sliding_window=6)
    prompt = list(range(40))
    first, _ = grow_by_decoding(bm, prompt, 48, window=6)
    assert first.block_table[:5] == [FREED_BLOCK] * 5
    assert bm.usage().num_cached_free >= 5  # released, but kept with their hashes
    second = Sequence("r2", prompt, SamplingParams())
    bm.allocate(second)
    assert second.num_cached_tokens == 36  # every full block of the prompt but the last token's
    bm.check_invariants([first.block_table, second.block_table])


def test_fork_and_free_skip_released_entries() -> None:
    bm = BlockManager(64, BLOCK_SIZE, False, sliding_window=5)
    parent, _ = grow_by_decoding(bm, list(range(12)), 40, window=5)
    child = Sequence("r", [0], SamplingParams())
    bm.fork(parent, child)
    bm.check_invariants([parent.block_table, child.block_table])
    bm.free(parent)
    bm.check_invariants([child.block_table])
    bm.free(child)
    bm.check_invariants([])


def test_can_grow_counts_blocks_the_window_will_release() -> None:
    # A pool just big enough for the window: growth must rely on releasing old blocks.
    bm = BlockManager(5, BLOCK_SIZE, False, sliding_window=8)
    seq, most_held = grow_by_decoding(bm, list(range(8)), 64, window=8)
    assert most_held <= 5 and len(seq.block_table) == 16


def test_free_window_is_the_widest_and_none_with_any_global_layer() -> None:
    assert kv_free_window([4096] * 3) == 4096
    assert kv_free_window([512, 1024]) == 1024
    assert kv_free_window([512, None, 512]) is None  # Gemma 3: a global layer keeps everything
    assert kv_free_window([None, None]) is None
    assert kv_free_window([]) is None


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_admission_with_a_chunk_bound_holds_window_plus_chunk_not_the_prompt(prefix_caching: bool) -> None:
    """allocate(seq, max_new_tokens=budget): a 200-token prompt with a 10-token window and 16-token
    chunks never holds more than the window and one chunk, from admission on."""
    window, budget = 10, 16
    bm = BlockManager(64, BLOCK_SIZE, prefix_caching, sliding_window=window)
    cache = SimulatedCache(bm)
    prompt = list(range(200))
    seq = Sequence("r", prompt, SamplingParams())
    assert bm.num_blocks_to_allocate(seq, budget) == budget // BLOCK_SIZE < bm.num_blocks_to_allocate(seq)
    assert bm.can_allocate(seq, max_new_tokens=budget)
    bm.allocate(seq, budget)
    assert len(seq.block_table) == budget // BLOCK_SIZE
    bound = -(-(window - 1) // BLOCK_SIZE) + 1 + budget // BLOCK_SIZE + (1 if prefix_caching else 0)
    while seq.num_computed_tokens < len(prompt):
        cache.step(seq, min(budget, len(prompt) - seq.num_computed_tokens))
        assert bm.usage().num_used <= bound
        assert cache.window_reads_back(seq, window)
        bm.check_invariants([seq.block_table])
    if prefix_caching:  # a second identical prompt: its cached prefix plus one chunk
        again = Sequence("r2", prompt, SamplingParams())
        hits = (len(prompt) - 1) // BLOCK_SIZE
        assert bm.num_blocks_to_allocate(again, budget) == min(50, hits + budget // BLOCK_SIZE)
        bm.allocate(again, budget)
        assert again.num_computed_tokens == hits * BLOCK_SIZE
        bm.check_invariants([seq.block_table, again.block_table])


def test_without_a_window_the_chunk_bound_changes_nothing() -> None:
    bm = BlockManager(64, BLOCK_SIZE, True, sliding_window=None)
    seq = Sequence("r", list(range(100)), SamplingParams())
    assert bm.num_blocks_to_allocate(seq, 16) == bm.num_blocks_to_allocate(seq) == 25
    bm.allocate(seq, 16)
    assert len(seq.block_table) == 25
