"""Paged KV cache bookkeeping: blocks, reference counts, prefix caching. No torch here.

Contract
- A block holds `block_size` consecutive token positions of one or more sequences (shared by
  prefix hits and n > 1 forks). `ref_count` = number of block tables that list it.
- A *full* block gets a chained hash: hash(parent block's hash, its token ids), so equal hashes
  mean equal whole prefixes. The hash is registered (`commit`) once a step that writes the
  block's K/V is scheduled (prompt blocks, by the scheduler) or has run (generated tokens): a hit
  is only ever read by the same step, after the block's writes (every row's K/V of a layer is
  stored before any row attends), or by a later one.
- A block whose ref_count drops to 0 but that holds a registered hash stays reusable: it goes to
  the LRU of cached-free blocks, evicted (hash dropped) only when a fresh block is needed.
- Sliding windows (`sliding_window`: set when every layer of the model slides, to the widest
  window): a leading block that no future query can see (wholly before num_computed_tokens -
  window + 1) is released when the sequence grows, and its table entry becomes FREED_BLOCK (-1),
  which the attention kernels never read. With prefix caching only hashed blocks are released and
  the newest hashed one stays (the next hash chains from it); a released hashed block goes to the
  cached-free LRU like any other, so a later prompt can still hit it.
- Every change of a sequence's block_table bumps `seq.table_version` (the model runner rewrites
  its row of the step's block tables only then).
- The caller (Scheduler) is single-threaded; nothing here locks.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from appliance.engine.sequence import Sequence

FREED_BLOCK = -1  # a block-table entry released because it fell out of every layer's window


def kv_free_window(sliding_windows: list[int | None]) -> int | None:
    """The window after which blocks may be released: the widest of the layers' windows, or None
    when any layer attends globally (Gemma 3's global layers keep every block)."""
    if not sliding_windows or any(window is None for window in sliding_windows):
        return None
    return max(window for window in sliding_windows if window is not None)


class NoFreeBlocksError(RuntimeError):
    """Raised by allocation when the pool is exhausted; the scheduler checks first and preempts."""


@functools.lru_cache(maxsize=64)
def _packer(num_tokens: int) -> Callable[..., bytes]:
    return struct.Struct(f"<{num_tokens}q").pack  # compiled once per length (a block's: one)


def chain_hash(parent_hash: bytes | None, token_ids: list[int] | tuple[int, ...]) -> bytes:
    h = hashlib.blake2b(parent_hash or b"root", digest_size=16)
    h.update(_packer(len(token_ids))(*token_ids))
    return h.digest()


class Block(msgspec.Struct, gc=False):
    """NOTE: not tracked by the cyclic GC (msgspec gc=False; it holds only ints, bytes and a tuple of
    ints, so it is never part of a cycle): a KV cache has hundreds of thousands of blocks, and as
    tracked objects they made every full collection walk them all."""

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] = ()  # kept for the collision check on a hit


@dataclass(frozen=True)
class BlockUsage:
    num_total: int
    num_used: int  # ref_count > 0
    num_cached_free: int  # ref_count == 0, holding a reusable prefix
    num_free: int  # ref_count == 0, empty (cached-free blocks are also allocatable)
    prefix_queries_tokens: int
    prefix_hits_tokens: int

    @property
    def usage(self) -> float:
        return self.num_used / self.num_total if self.num_total else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None) -> None:
        assert num_blocks > 0 and block_size > 0
        assert sliding_window is None or sliding_window >= 1
        self.block_size = block_size
        self.sliding_window = sliding_window  # see kv_free_window
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free_ids: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() from the end: low ids first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # LRU order: oldest first
        self._hash_to_block: dict[bytes, int] = {}
        self._pending_copies: list[tuple[int, int]] = []
        self.prefix_queries_tokens = 0
        self.prefix_hits_tokens = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_allocatable(self) -> int:
        return len(self._free_ids) + len(self._cached_free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def usage(self) -> BlockUsage:
        # NOTE: every unreferenced block is in exactly one of the two pools (check_invariants).
        used = self.num_blocks - len(self._free_ids) - len(self._cached_free)
        return BlockUsage(
            num_total=self.num_blocks,
            num_used=used,
            num_cached_free=len(self._cached_free),
            num_free=len(self._free_ids),
            prefix_queries_tokens=self.prefix_queries_tokens,
            prefix_hits_tokens=self.prefix_hits_tokens,
        )

    def common_prefix(self, candidates: tuple[Sequence, ...], min_tables: int) -> list[int]:
        """The shared prefix for cascade attention: leading blocks of one candidate's table, listed
        by at least `min_tables` (>= 2) block tables, chosen to maximise the work saved, (tables
        listing its last block) x (its length). O(the candidates' shared blocks).

        Whether a table starts with the returned blocks is known from its entry at the last
        index alone: a shared block sits at the same index in every table that lists it, and
        everything before it holds the same tokens (prefix hits chain their hashes from the first
        block, forks copy the whole table, copy-on-write replaces only the block being written)."""
        min_tables = max(2, min_tables)
        best: list[int] = []
        best_score = 0
        for seq in candidates:
            table = seq.block_table
            for i, block_id in enumerate(table):
                if block_id == FREED_BLOCK or self.blocks[block_id].ref_count < min_tables:
                    break
                score = self.blocks[block_id].ref_count * (i + 1)
                if score > best_score:
                    best, best_score = table[: i + 1], score
        return best

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """Copy-on-write (src, dst) pairs the model runner must apply before the next forward."""
        copies, self._pending_copies = self._pending_copies, []
        return copies

    # ------------------------------------------------------------------ internals
    def _take_fresh(self) -> int:
        if self._free_ids:
            block_id = self._free_ids.pop()
        elif self._cached_free:
            block_id, _ = self._cached_free.popitem(last=False)  # evict the least recently used
            block = self.blocks[block_id]
            if block.block_hash is not None and self._hash_to_block.get(block.block_hash) == block_id:
                del self._hash_to_block[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        else:
            raise NoFreeBlocksError("KV cache has no free block")
        block = self.blocks[block_id]
        assert block.ref_count == 0, f"block {block_id} handed out while referenced"
        block.ref_count = 1
        return block_id

    def _incref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            self._cached_free.pop(block_id, None)
        block.ref_count += 1

    def _decref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is not None:
                self._cached_free[block_id] = None  # most recently used at the end
            else:
                self._free_ids.append(block_id)

    def _lookup(self, parent_hash: bytes | None, tokens: tuple[int, ...]) -> tuple[bytes, int | None]:
        block_hash = chain_hash(parent_hash, tokens)
        block_id = self._hash_to_block.get(block_hash)
        if block_id is not None and self.blocks[block_id].token_ids != tokens:
            block_id = None  # hash collision: never serve another prefix's K/V
        return block_hash, block_id

    # ------------------------------------------------------------------ admission
    def num_blocks_to_allocate(self, seq: Sequence, max_new_tokens: int | None = None) -> int:
        """Fresh blocks `allocate(seq, max_new_tokens)` would take (prefix hits on free-cached
        blocks count too)."""
        return self.blocks_needed(self._tokens_to_cover(seq, max_new_tokens, None))

    def can_allocate(self, seq: Sequence, reserve: int = 0, max_new_tokens: int | None = None) -> bool:
        return self.num_allocatable - reserve >= self.num_blocks_to_allocate(seq, max_new_tokens)

    def _tokens_to_cover(self, seq: Sequence, max_new_tokens: int | None, num_hit_blocks: int | None) -> int:
        """Positions an admission covers: every known token; with a sliding window and a chunk bound,
        only the cached prefix and the first chunk (later chunks `grow`, releasing as they go)."""
        if self.sliding_window is None or max_new_tokens is None:
            return len(seq)
        if num_hit_blocks is None:  # admission check: count the hits without taking them
            num_hit_blocks = len(self._prefix_hits(seq))
        return min(len(seq), num_hit_blocks * self.block_size + max_new_tokens)

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """The cached blocks that hold seq's leading full blocks (looked up, not referenced)."""
        tokens = seq.token_ids
        # [apps] a request that wants its prompt's logprobs runs every prompt token through the model.
        if not self.enable_prefix_caching or seq.sampling_params.prompt_logprobs is not None:
            return []
        # Never serve the whole sequence from cache: the last token must run through the model.
        max_hit_blocks = (len(tokens) - 1) // self.block_size
        hits: list[int] = []
        parent: bytes | None = None
        for i in range(min(len(tokens) // self.block_size, max_hit_blocks)):
            chunk = tuple(tokens[i * self.block_size : (i + 1) * self.block_size])
            parent, block_id = self._lookup(parent, chunk)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, max_new_tokens: int | None = None) -> None:
        """Give a waiting sequence blocks for all its known tokens, reusing cached prefix blocks.

        Sets seq.num_computed_tokens to the number of tokens found in the cache. NOTE: at least
        one token is always left to compute, so the step produces logits to sample from.
        max_new_tokens (the step's budget): with a sliding window, cover only the cached prefix and
        this many tokens more, so a long prompt never holds more than its window and a chunk.
        """
        assert not seq.block_table, f"{seq} already has blocks"
        hits = self._prefix_hits(seq)
        if self.enable_prefix_caching and seq.sampling_params.prompt_logprobs is None:
            self.prefix_queries_tokens += len(seq.token_ids) // self.block_size * self.block_size
            self.prefix_hits_tokens += len(hits) * self.block_size
        for block_id in hits:  # referenced before any fresh block is taken: never evicted by it
            self._incref(block_id)
        table = list(hits)
        try:
            for _ in range(self.blocks_needed(self._tokens_to_cover(seq, max_new_tokens, len(hits))) - len(hits)):
                table.append(self._take_fresh())
        except NoFreeBlocksError:
            for block_id in table:
                self._decref(block_id)
            raise
        seq.block_table = table
        seq.table_version += 1
        seq.num_hashed_blocks = len(hits)
        seq.num_cached_tokens = len(hits) * self.block_size
        seq.num_computed_tokens = len(hits) * self.block_size

    # ------------------------------------------------------------------ growth
    def slots_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Fresh blocks needed so the table covers `num_tokens` positions (incl. copy-on-write)."""
        need = max(0, self.blocks_needed(num_tokens) - len(seq.block_table))
        if self._needs_cow(seq, num_tokens):
            need += 1
        return need

    def _needs_cow(self, seq: Sequence, num_tokens: int) -> bool:
        # The next write lands in the last block of the table, and another table shares it.
        if not seq.block_table or seq.num_computed_tokens >= num_tokens:
            return False
        first_write_block = seq.num_computed_tokens // self.block_size
        if first_write_block >= len(seq.block_table):
            return False
        return self.blocks[seq.block_table[first_write_block]].ref_count > 1

    def covers(self, seq: Sequence, num_tokens: int) -> bool:
        """True when `grow(seq, num_tokens)` would do nothing: the table already reaches
        num_tokens and the block the step writes into is not shared (the common decode step)."""
        table = seq.block_table
        if num_tokens > len(table) * self.block_size:
            return False
        first_write_block = seq.num_computed_tokens // self.block_size
        return first_write_block >= len(table) or self.blocks[table[first_write_block]].ref_count == 1

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_allocatable + self._num_releasable(seq) >= self.slots_needed(seq, num_tokens)

    def _out_of_window_end(self, seq: Sequence) -> int:
        """Table entries [0, end) that no future query of seq can see (see the module docstring)."""
        if self.sliding_window is None:
            return 0
        end = max(0, seq.num_computed_tokens - self.sliding_window + 1) // self.block_size
        if self.enable_prefix_caching:
            end = min(end, seq.num_hashed_blocks - 1)
        return max(end, 0)

    def _num_releasable(self, seq: Sequence) -> int:
        """Blocks that releasing seq's out-of-window entries would make allocatable."""
        end = self._out_of_window_end(seq)
        return sum(1 for block_id in seq.block_table[:end]
                   if block_id != FREED_BLOCK and self.blocks[block_id].ref_count == 1)

    def release_out_of_window(self, seq: Sequence) -> int:
        """Release the blocks seq's queries can no longer see; returns how many table entries."""
        table = seq.block_table
        released = 0
        # NOTE: released entries are always a prefix of the table: walk back from the end of the
        # dead range to the last one released before (O(newly released), not O(table)).
        i = min(self._out_of_window_end(seq), len(table)) - 1
        while i >= 0 and table[i] != FREED_BLOCK:
            self._decref(table[i])
            table[i] = FREED_BLOCK
            released += 1
            i -= 1
        if released:
            seq.table_version += 1
        return released

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make seq.block_table cover positions [0, num_tokens); copy a shared partial block first.
        With a sliding window, the blocks that fell out of it are released first."""
        if self.sliding_window is not None:
            self.release_out_of_window(seq)
        if self._needs_cow(seq, num_tokens):
            idx = seq.num_computed_tokens // self.block_size
            src = seq.block_table[idx]
            dst = self._take_fresh()
            self._pending_copies.append((src, dst))
            self._decref(src)
            seq.block_table[idx] = dst
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._take_fresh())
        seq.table_version += 1

    def commit(self, seq: Sequence, num_written_tokens: int | None = None) -> None:
        """Register the hashes of blocks that became full (when scheduled or after a step).

        num_written_tokens: positions whose K/V the finished step wrote (default: every computed
        one). With async scheduling the next step is already counted in num_computed_tokens.
        NOTE: O(new full blocks) per call: seq.num_hashed_blocks marks how far the chain is done.
        """
        if not self.enable_prefix_caching:
            return
        written = seq.num_computed_tokens if num_written_tokens is None else num_written_tokens
        num_full = min(written, len(seq.token_ids)) // self.block_size
        first = seq.num_hashed_blocks
        if first >= num_full:
            return
        parent = self.blocks[seq.block_table[first - 1]].block_hash if first > 0 else None
        for i in range(first, num_full):
            block = self.blocks[seq.block_table[i]]
            chunk = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            if block.block_hash is not None and block.token_ids == chunk:
                parent = block.block_hash
                continue
            block_hash = chain_hash(parent, chunk)
            if block.block_hash is None:
                block.block_hash, block.token_ids = block_hash, chunk
                # First writer wins; a later identical block stays unregistered but valid.
                self._hash_to_block.setdefault(block_hash, block.block_id)
            parent = block.block_hash
        seq.num_hashed_blocks = num_full

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (n > 1 after the prompt's prefill)."""
        assert not child.block_table
        for block_id in parent.block_table:
            if block_id != FREED_BLOCK:
                self._incref(block_id)
        child.block_table = list(parent.block_table)
        child.table_version += 1
        child.num_hashed_blocks = parent.num_hashed_blocks

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # reversed: the prefix's head is evicted last
            if block_id != FREED_BLOCK:
                self._decref(block_id)
        seq.block_table = []
        seq.table_version += 1
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def check_invariants(self, live_tables: list[list[int]]) -> None:
        """Tests: refcounts equal table membership; every block is in exactly one pool."""
        counts = [0] * self.num_blocks
        for table in live_tables:
            for block_id in table:
                if block_id != FREED_BLOCK:
                    counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], (block, counts[block.block_id])
        free = set(self._free_ids)
        cached = set(self._cached_free)
        assert len(free) == len(self._free_ids), "a block is twice in the free list"
        assert not free & cached
        for block in self.blocks:
            in_pools = (block.block_id in free) + (block.block_id in cached)
            assert in_pools == (1 if block.ref_count == 0 else 0), block
        for block_hash, block_id in self._hash_to_block.items():
            assert self.blocks[block_id].block_hash == block_hash
