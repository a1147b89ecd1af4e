"""Cascade attention (kernels/cascade_attention.py) against plain decode attention's reference.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py) in float32 at tiny
shapes; with CUDA the same cases also run in bfloat16/float16, plus a CUDA-graph replay with
prefix lengths other than the captured one.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from appliance_kernels import attention, cascade_attention, reference
from appliance_kernels.fp8 import FP8_DTYPE

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs CUDA")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=NEEDS_CUDA), pytest.param(torch.float16, marks=NEEDS_CUDA)]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}


class SharedBatch:
    """A decode batch whose tables start with the same `num_shared` blocks (shuffled ids): q
    [B, Hq, D], caches, tables, seq_lens, and the shared block ids."""

    def __init__(self, seq_lens: list[int], num_shared: int, num_q_heads: int, num_kv_heads: int, head_dim: int,
                 block_size: int, dtype: torch.dtype, generator: torch.Generator,
                 cache_dtype: torch.dtype | None = None, loners: tuple[int, ...] = ()) -> None:
        """loners: rows that share no block (their whole context in blocks of their own)."""
        blocks = [-(-n // block_size) for n in seq_lens]
        own = [n if b in loners else max(0, n - num_shared) for b, n in enumerate(blocks)]
        num_blocks = num_shared + sum(own) + 2  # two spare blocks nobody references
        order = torch.randperm(num_blocks, generator=generator).to(torch.int32)
        shared = order[:num_shared]
        tables = torch.full((len(seq_lens), max(blocks) + 1), -1, dtype=torch.int32)
        used = num_shared
        for b, n in enumerate(blocks):
            first = 0 if b in loners else min(n, num_shared)  # a short row holds the shared blocks it reaches
            tables[b, :first] = shared[:first]
            tables[b, first:n] = order[used : used + own[b]]
            used += own[b]
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, generator=generator).to(cache_dtype or dtype).to(DEVICE)
        self.v_cache = torch.randn(shape, generator=generator).to(cache_dtype or dtype).to(DEVICE)
        self.q = torch.randn((len(seq_lens), num_q_heads, head_dim), generator=generator).to(dtype).to(DEVICE)
        self.block_tables = tables.to(DEVICE)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
        self.prefix_blocks = shared.to(DEVICE)

    def plain_reference(self, scale: float, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """Plain decode attention over each row's whole context (no cascade)."""
        qsl = torch.arange(len(self.seq_lens) + 1, dtype=torch.int32)
        cpu = [t.cpu() for t in (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens)]
        return reference.paged_attention_ref(*cpu[:4], cpu[4], qsl, scale, k_scale, v_scale).float()

    def cascade(self, prefix_len: int, scale: float, **kwargs: object) -> torch.Tensor:
        out = torch.full_like(self.q, float("nan"))  # poisoned: every row must be written
        length = torch.tensor([prefix_len], dtype=torch.int32, device=DEVICE)
        return cascade_attention.cascade_attention(self.q, self.k_cache, self.v_cache, self.block_tables,
                                                   self.seq_lens, self.prefix_blocks, length, scale, out=out,
                                                   **kwargs)

    def cascade_reference(self, prefix_len: int, scale: float, k_scale: float = 1.0,
                          v_scale: float = 1.0) -> torch.Tensor:
        cpu = [t.cpu() for t in (self.q, self.k_cache, self.v_cache, self.block_tables, self.seq_lens,
                                 self.prefix_blocks)]
        return reference.cascade_attention_ref(*cpu, prefix_len, scale, k_scale, v_scale).float()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output: a row was not written or the softmax broke"
    return float((out.float().cpu() - ref).norm() / ref.norm())


# (seq_lens as (shared tokens + own tokens), shared blocks, prefix_len in tokens) for block size bs
def _cases(bs: int) -> dict[str, tuple[list[int], int, int]]:
    shared = 3 * bs
    return {
        "no-prefix": ([shared + 5, shared + 1, shared + 2 * bs + 3], 3, 0),  # plain decode
        "aligned": ([shared + 5, shared + 1, shared + 2 * bs + 3, shared + 9], 3, shared),
        "partial": ([shared + 5, shared + 1, shared + 2 * bs + 3], 3, shared - 3),  # not on a block edge
        "whole-minus-1": ([shared + 1] * 5, 3, shared),  # the suffix is the new token alone
        "short-rows": ([shared + 4, 1, bs + 2], 3, shared),  # rows shorter than the prefix (graph padding)
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 8, 16])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [(4, 2, 64), (6, 2, 64),
                                                                        (2, 2, 128)])
@pytest.mark.parametrize("case", list(_cases(4)))
def test_cascade_matches_plain_decode(dtype: torch.dtype, block_size: int, num_q_heads: int, num_kv_heads: int,
                                      head_dim: int, case: str) -> None:
    seq_lens, num_shared, prefix_len = _cases(block_size)[case]
    generator = torch.Generator().manual_seed(zlib.crc32(repr((block_size, num_q_heads, head_dim, case)).encode()))
    batch = SharedBatch(seq_lens, num_shared, num_q_heads, num_kv_heads, head_dim, block_size, dtype, generator)
    scale = head_dim**-0.5
    plain = batch.plain_reference(scale)
    assert relative_error(batch.cascade_reference(prefix_len, scale), plain) <= 1e-5
    assert relative_error(batch.cascade(prefix_len, scale), plain) <= TOLERANCE[dtype]


SMALL_TILE = {"rows": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix_splits", [1, 2, 8])
@pytest.mark.parametrize("tile", ["small", "default", "wide"])
def test_prefix_splits_and_tiles_that_hold_part_of_the_batch(dtype: torch.dtype, prefix_splits: int,
                                                             tile: str) -> None:
    """Several sequence tiles (a 16-row tile holds 4 sequences of a group of 4), prefix partitions
    that are empty (8 of 20 keys), and a batch that ends mid-tile; the launcher's two tiles too."""
    generator = torch.Generator().manual_seed(prefix_splits)
    seq_lens = [20 + n for n in (1, 7, 3, 12, 1, 30, 2, 5, 9, 4, 6)]
    batch = SharedBatch(seq_lens, 5, 8, 2, 64, 4, dtype, generator)
    tiles = {"small": SMALL_TILE, "default": cascade_attention.PREFIX_TILE, "wide": cascade_attention.PREFIX_TILE_WIDE}
    out = batch.cascade(20, 0.125, prefix_splits=prefix_splits, prefix_tile=tiles[tile])
    assert relative_error(out, batch.plain_reference(0.125)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 16])
def test_rows_that_share_part_or_none_of_the_prefix(dtype: torch.dtype, block_size: int) -> None:
    """row_prefix_lens: rows 1 and 4 hold their own copies (share 0), row 2 shares one block less
    than the others, the rest share it all."""
    generator = torch.Generator().manual_seed(block_size)
    shared = 4 * block_size
    seq_lens = [shared + n for n in (3, 9, 1, 5, 2 * block_size)]
    batch = SharedBatch(seq_lens, 4, 8, 2, 64, block_size, dtype, generator, loners=(1, 4))
    shares = torch.tensor([shared, 0, shared - block_size, shared, 0], dtype=torch.int32)
    plain = batch.plain_reference(0.125)
    cpu = [t.cpu() for t in (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                             batch.prefix_blocks)]
    ref = reference.cascade_attention_ref(*cpu, shared, 0.125, row_prefix_lens=shares)
    assert relative_error(ref, plain) <= 1e-5
    assert relative_error(batch.cascade_reference(shared, 0.125), plain) > 1e-2  # loners read the wrong blocks
    out = batch.cascade(shared, 0.125, row_prefix_lens=shares.to(DEVICE))
    assert relative_error(out, plain) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_prefix_equals_the_decode_kernel(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(7)
    batch = SharedBatch([9, 40, 71, 16], 2, 8, 2, 64, 8, dtype, generator)
    qsl = torch.arange(5, dtype=torch.int32, device=DEVICE)
    plain = attention.paged_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, qsl,
                                      0.1, max_query_len=1, max_seq_len=71, is_decode_only=True)
    assert relative_error(batch.cascade(0, 0.1), plain.float().cpu()) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=NEEDS_CUDA)])
def test_fp8_cache_matches_dequantized_reference(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(11)
    batch = SharedBatch([37, 33, 50], 2, 8, 2, 64, 16, dtype, generator, cache_dtype=FP8_DTYPE)
    scale, k_scale, v_scale = 0.125, 0.5, 2.0
    plain = batch.plain_reference(scale, k_scale, v_scale)
    assert relative_error(batch.cascade_reference(32, scale, k_scale, v_scale), plain) <= 1e-5
    out = batch.cascade(32, scale, k_scale=k_scale, v_scale=v_scale)
    assert relative_error(out, plain) <= TOLERANCE[dtype]


def test_bad_inputs_are_refused() -> None:
    batch = SharedBatch([9, 12], 2, 4, 2, 64, 4, torch.float32, torch.Generator().manual_seed(0))
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.prefix_blocks)
    length = torch.tensor([8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="prefix_len must be a one-element int32"):
        cascade_attention.cascade_attention(*args, length.long(), 0.1)
    with pytest.raises(ValueError, match="power of two"):
        cascade_attention.cascade_attention(*args, length, 0.1, prefix_splits=3)
    with pytest.raises(ValueError, match="beyond what 2 prefix blocks"):
        cascade_attention.cascade_attention(*args, length, 0.1, max_prefix_len=9)
    with pytest.raises(ValueError, match="one per row of q"):
        cascade_attention.cascade_attention(batch.q[:1], *args[1:], length, 0.1)
    with pytest.raises(ValueError, match="fp8 cache only"):
        cascade_attention.cascade_attention(*args, length, 0.1, k_scale=2.0)
    with pytest.raises(ValueError, match="row_prefix_lens must be a contiguous int32"):
        cascade_attention.cascade_attention(*args, length, 0.1, row_prefix_lens=length)


def test_prefix_splits_fill_the_gpu_and_follow_the_bound() -> None:
    # 256 Llama-8B rows: 8 tiles of 32 sequences x 8 kv heads = 64 programs; about two waves of an
    # H100's 132 SMs wants 5 -> 8 partitions, but a 512-token bound allows only 2.
    assert cascade_attention.choose_prefix_splits(256, 8, 4, 2048, torch.device("cpu")) == 8
    assert cascade_attention.choose_prefix_splits(256, 8, 4, 512, torch.device("cpu")) == 2
    assert cascade_attention.choose_prefix_splits(4096, 8, 4, 1 << 15, torch.device("cpu")) == 1


@NEEDS_CUDA
def test_cuda_graph_replays_with_other_prefix_lengths() -> None:
    """The grid depends on shapes only: a graph captured at one prefix length replays exactly at
    others (0 and the whole shared part included)."""
    generator = torch.Generator().manual_seed(3)
    bs = 16
    batch = SharedBatch([130 + n for n in range(1, 40)], 8, 32, 8, 128, bs, torch.bfloat16, generator)
    length = torch.tensor([64], dtype=torch.int32, device=DEVICE)
    shares = torch.full((len(batch.seq_lens),), 64, dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(batch.q)

    def run() -> None:
        cascade_attention.cascade_attention(batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
                                            batch.seq_lens, batch.prefix_blocks, length, 0.1, out=out,
                                            row_prefix_lens=shares)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        run()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        run()
    plain = batch.plain_reference(0.1)
    for prefix_len in (0, 16, 64, 100, 128):
        length.fill_(prefix_len)
        shares.fill_(prefix_len)
        shares[::3] = prefix_len // 2  # every third row shares less
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert relative_error(out, plain) <= TOLERANCE[torch.bfloat16], prefix_len
