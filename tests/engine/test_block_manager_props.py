"""BlockManager properties under random allocate / compute / fork / free sequences (hypothesis).

Drives the real BlockManager directly (no scheduler, no torch) with a simulated paged KV cache:
every computed position's token id is written into its slot, so after every operation we can
check that each live sequence reads back exactly its own tokens, that cached blocks still hold
what their hash says, and that reference counts equal the number of tables holding each block.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.engine import block_manager as block_manager_module
from appliance.engine.block_manager import BlockManager, NoFreeBlocksError, chain_hash
from appliance.engine.sequence import SamplingParams, Sequence

BASES = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 8, 7, 6, 5], [3] * 8]

OPS = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "compute", "compute", "compute", "fork", "free"]),
        st.integers(0, 2**16),
        st.integers(0, 2**16),
    ),
    max_size=40,
)


def weak_chain_hash(parent_hash: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    """A deliberately colliding hash: same parent and same token sum mod 2 collide. The block
    manager's collision check (it compares a hit's tokens) must keep every hit exact."""
    return hashlib.blake2b((parent_hash or b"root") + bytes([sum(token_ids) % 2]), digest_size=16).digest()


class Harness:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, prefix_caching)
        self.bs = block_size
        self.kv: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.live: list[Sequence] = []

    def read(self, seq: Sequence, num_tokens: int) -> list[int | None]:
        return [self.kv[seq.block_table[p // self.bs]][p % self.bs] for p in range(num_tokens)]

    def add(self, a: int, b: int) -> None:
        base = BASES[a % len(BASES)]
        prompt = base[: 1 + a % len(base)] + [b % 5] * (b % 3)
        seq = Sequence("r", prompt, SamplingParams())
        before = self.bm.usage()
        can = self.bm.can_allocate(seq)
        try:
            self.bm.allocate(seq)
        except NoFreeBlocksError:
            assert not can
            # A failed allocation gives back every block it took (it may have evicted cached
            # prefixes on the way: the scheduler asks can_allocate first, so this never runs there).
            after = self.bm.usage()
            assert after.num_used == before.num_used
            assert after.num_free + after.num_cached_free == before.num_free + before.num_cached_free
            assert seq.block_table == []
            return
        hit = seq.num_computed_tokens
        assert hit == seq.num_cached_tokens and hit % self.bs == 0 and hit < len(seq)
        assert len(seq.block_table) == self.bm.blocks_needed(len(seq))
        # A prefix hit serves blocks holding exactly this prompt's first `hit` tokens.
        assert self.read(seq, hit) == seq.token_ids[:hit]
        if not self.bm.enable_prefix_caching:
            assert hit == 0
        self.live.append(seq)

    def compute(self, a: int, b: int) -> None:
        """One model step for a live sequence: compute some of its tokens, maybe sample one."""
        if not self.live:
            return
        seq = self.live[a % len(self.live)]
        target = seq.num_computed_tokens + 1 + b % max(seq.num_uncomputed_tokens, 1)
        target = min(target, len(seq))
        if target <= seq.num_computed_tokens:
            return
        if not self.bm.can_grow(seq, target):
            return  # the scheduler would preempt here
        self.bm.grow(seq, target)
        for src, dst in self.bm.take_pending_copies():
            assert self.bm.blocks[dst].ref_count == 1
            self.kv[dst] = list(self.kv[src])
        for pos in range(seq.num_computed_tokens, target):
            block = self.bm.blocks[seq.block_table[pos // self.bs]]
            assert block.ref_count == 1 and block.block_hash is None, f"write into shared/cached {block}"
            self.kv[block.block_id][pos % self.bs] = seq.token_ids[pos]
        seq.num_computed_tokens = target
        self.bm.commit(seq)
        if target == len(seq):
            seq.append_token(b % 7)

    def fork(self, a: int, b: int) -> None:
        """n > 1: a child shares every block of a sequence that has just sampled a token."""
        ready = [s for s in self.live if s.num_uncomputed_tokens == 1 and s.num_computed_tokens > 0]
        if not ready:
            return
        parent = ready[a % len(ready)]
        child = Sequence("r", parent.prompt_token_ids, parent.sampling_params, index=1)
        child.token_ids = parent.token_ids[:-1] + [b % 7]
        self.bm.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        self.live.append(child)

    def free(self, a: int, b: int) -> None:
        if self.live:
            seq = self.live.pop(a % len(self.live))
            self.bm.free(seq)
            assert seq.block_table == []

    def check(self) -> None:
        bm = self.bm
        bm.check_invariants([s.block_table for s in self.live])
        usage = bm.usage()
        assert usage.num_used + usage.num_free + usage.num_cached_free == usage.num_total
        assert usage.num_used == len({b for s in self.live for b in s.block_table})
        for seq in self.live:
            assert self.read(seq, seq.num_computed_tokens) == seq.token_ids[: seq.num_computed_tokens]
        for block in bm.blocks:
            if block.block_hash is not None:  # a cached block still holds what its hash names
                assert tuple(self.kv[block.block_id]) == block.token_ids
            if block.ref_count == 0:
                assert all(block.block_id not in s.block_table for s in self.live)


@pytest.mark.parametrize("weak_hash", [False, True], ids=["blake2b", "colliding-hash"])
def test_random_operations_keep_the_pool_consistent(weak_hash: bool) -> None:
    with pytest.MonkeyPatch.context() as mp:
        if weak_hash:
            mp.setattr(block_manager_module, "chain_hash", weak_chain_hash)
        run_random_operations()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    ops=OPS,
    num_blocks=st.integers(1, 10),
    block_size=st.sampled_from([1, 2, 3, 4]),
    prefix_caching=st.booleans(),
)
def run_random_operations(
    ops: list[tuple[str, int, int]], num_blocks: int, block_size: int, prefix_caching: bool
) -> None:
    h = Harness(num_blocks, block_size, prefix_caching)
    for op, a, b in ops:
        getattr(h, op)(a, b)
        h.check()
    while h.live:  # freeing everything leaves nothing used and nothing lost
        h.free(0, 0)
        h.check()
    usage = h.bm.usage()
    assert usage.num_used == 0 and usage.num_free + usage.num_cached_free == num_blocks


def test_prefix_hit_after_free_reuses_the_same_blocks() -> None:
    h = Harness(num_blocks=6, block_size=2, prefix_caching=True)
    first = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())
    h.bm.allocate(first)
    h.live.append(first)
    h.compute(0, 4)  # all 5 prompt tokens computed (1 + 4), a token sampled
    table = list(first.block_table)
    h.free(0, 0)
    h.check()
    assert h.bm.usage().num_cached_free == 2  # the two full blocks stay reusable
    again = Sequence("b", [1, 2, 3, 4, 5], SamplingParams())
    h.bm.allocate(again)
    h.live.append(again)
    assert again.num_cached_tokens == 4 and again.block_table[:2] == table[:2]
    other = Sequence("c", [1, 2, 9, 9, 9], SamplingParams())  # shares the first block only
    h.bm.allocate(other)
    h.live.append(other)
    assert other.block_table[:1] == table[:1] and other.num_cached_tokens == 2
    assert h.bm.blocks[table[0]].ref_count == 2
    assert h.bm.blocks[table[0]].block_hash == chain_hash(None, [1, 2])
    h.check()
