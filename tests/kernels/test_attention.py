"""Paged attention and KV writes against the torch references, over mixed decode/prefill batches.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py) in float32 at tiny
shapes; with CUDA the same grid also runs in bfloat16 at the issue's tolerance, plus a CUDA-graph
replay that proves the launcher reads no device values on the host.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import pytest
import torch
from appliance_kernels import attention, reference
from appliance_kernels.fp8 import FP8_DTYPE

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))]
# fp32: exact math (interpreter, or IEEE dots on GPU). bf16: the bound.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}

# (new tokens per sequence, context tokens already cached before them)
MIXED = ([1, 7, 1, 20, 1], [9, 0, 33, 5, 1])  # decode, fresh prefill, decode, chunk after context, ...
DECODE = ([1, 1, 1, 1], [2, 40, 71, 16])
PREFILL = ([13, 4], [0, 19])


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [N, BS, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # int32 [B, max_blocks]
    seq_lens: torch.Tensor  # int32 [B]
    query_start_loc: torch.Tensor  # int32 [B + 1]
    max_query_len: int
    max_seq_len: int


def make_batch(q_lens: list[int], ctx_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, generator: torch.Generator,
               cache_dtype: torch.dtype | None = None) -> PagedBatch:
    """Random q and caches (of `cache_dtype`, default q's); each sequence's blocks are scattered at
    random (shuffled block ids)."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2  # spare blocks nobody references
    order = torch.randperm(num_blocks, generator=generator)
    block_tables = torch.full((len(q_lens), max(blocks_per_seq) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = order[used:used + n]
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=generator).to(cache_dtype or dtype)
    v_cache = torch.randn(shape, generator=generator).to(cache_dtype or dtype)
    q = torch.randn((sum(q_lens), num_q_heads, head_dim), generator=generator).to(dtype)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    return PagedBatch(
        q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), block_tables.to(DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        torch.tensor(starts, dtype=torch.int32, device=DEVICE), max(q_lens), max(seq_lens),
    )


def reference_attention(batch: PagedBatch, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                        sliding_window: int | None = None) -> torch.Tensor:
    cpu = [t.cpu() for t in (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                             batch.query_start_loc)]
    return reference.paged_attention_ref(*cpu, scale, k_scale, v_scale, sliding_window).float()


def free_out_of_window(batch: PagedBatch, window: int) -> tuple[PagedBatch, int]:
    """The batch as the block manager leaves it: blocks wholly before each sequence's first window
    marked -1 in the table, and (here) poisoned with NaN, so a kernel that reads one fails.
    Returns the new batch and how many blocks were freed."""
    tables = batch.block_tables.clone()
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    block_size = k_cache.shape[1]
    q_lens = (batch.query_start_loc[1:] - batch.query_start_loc[:-1]).tolist()
    freed = 0
    for b, (seq_len, q_len) in enumerate(zip(batch.seq_lens.tolist(), q_lens, strict=True)):
        first_needed = max(0, seq_len - q_len - window + 1)
        for i in range(first_needed // block_size):
            k_cache[tables[b, i]] = float("nan")
            v_cache[tables[b, i]] = float("nan")
            tables[b, i] = -1
            freed += 1
    return PagedBatch(batch.q, k_cache, v_cache, tables, batch.seq_lens, batch.query_start_loc,
                      batch.max_query_len, batch.max_seq_len), freed


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN in the output: a row was not written or the softmax broke"
    return float((out.float().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [(2, 2, 64), (4, 2, 16), (8, 2, 64), (6, 2, 48)])
@pytest.mark.parametrize("lens", [MIXED, DECODE, PREFILL], ids=["mixed", "decode", "prefill"])
def test_paged_attention_matches_reference(dtype: torch.dtype, block_size: int, num_q_heads: int, num_kv_heads: int,
                                           head_dim: int, lens: tuple[list[int], list[int]]) -> None:
    generator = torch.Generator().manual_seed(zlib.crc32(repr((block_size, num_q_heads, head_dim, lens)).encode()))
    batch = make_batch(*lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, generator)
    scale = head_dim**-0.5
    out = torch.full_like(batch.q, float("nan"))  # poisoned: every row must be written
    attention.paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale,
        max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len, out=out,
    )
    assert relative_error(out, reference_attention(batch, scale)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 5, 16, 100])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads", "head_dim"), [(4, 2, 16), (6, 2, 48)])
@pytest.mark.parametrize("lens", [MIXED, DECODE, PREFILL], ids=["mixed", "decode", "prefill"])
def test_sliding_window_matches_reference_with_freed_blocks(dtype: torch.dtype, window: int, num_q_heads: int,
                                                            num_kv_heads: int, head_dim: int,
                                                            lens: tuple[list[int], list[int]]) -> None:
    """Each row sees its last `window` keys; blocks before every window are -1 in the table and NaN
    in the cache (as after the block manager freed them), and nothing reads them."""
    generator = torch.Generator().manual_seed(zlib.crc32(repr((window, num_q_heads, lens)).encode()))
    full = make_batch(*lens, num_q_heads, num_kv_heads, head_dim, 4, dtype, generator)
    batch, freed = free_out_of_window(full, window)
    if window <= 5 and lens is not PREFILL:
        assert freed > 0  # the case is meant to exercise freed entries
    scale = head_dim**-0.5
    out = torch.full_like(batch.q, float("nan"))
    attention.paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale,
        max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len, out=out, sliding_window=window,
    )
    ref = reference_attention(full, scale, sliding_window=window)
    assert relative_error(out, ref) <= TOLERANCE[dtype]
    if window < max(lens[1]):  # the window changed the answer: the mask is not a no-op
        assert relative_error(reference_attention(full, scale), ref) > 1e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_splits", "window"), [(2, 7), (8, 40), (4, 1000)])
@pytest.mark.parametrize("num_decodes", [0, 4])
def test_sliding_window_split_kv_and_mixed_launches(dtype: torch.dtype, num_splits: int, window: int,
                                                    num_decodes: int) -> None:
    """Long-context decode rows split only their window; in a mixed batch the decode launch and the
    prefill launch both honour it."""
    generator = torch.Generator().manual_seed(num_splits * 100 + window)
    full = make_batch([1, 1, 1, 1, 9, 20], [300, 3, 150, 64, 0, 45], 4, 1, 32, 16, dtype, generator)
    batch, _ = free_out_of_window(full, window)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.2)
    ref = reference_attention(full, 0.2, sliding_window=window)
    decodes = (0, 4)
    split_out = attention.paged_attention_with_splits(*args, max_query_len=1, num_splits=num_splits, seqs=decodes,
                                                      sliding_window=window)
    assert relative_error(split_out[:4], ref[:4]) <= TOLERANCE[dtype]
    out = torch.full_like(batch.q, float("nan"))
    attention.paged_attention(*args, max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len, out=out,
                              num_decodes=num_decodes, sliding_window=window)
    assert relative_error(out, ref) <= TOLERANCE[dtype]


def test_decode_splits_follow_the_window_not_the_context() -> None:
    assert attention._keys_seen(32768, 4096) == 4096
    assert attention.choose_num_splits(1, 8, attention._keys_seen(32768, 128), DEVICE) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [2, 8])
@pytest.mark.parametrize(("num_q_heads", "num_kv_heads"), [(4, 1), (3, 3)])
def test_split_kv_decode_matches_reference(dtype: torch.dtype, num_splits: int, num_q_heads: int,
                                           num_kv_heads: int) -> None:
    # Context 3 with 8 splits leaves most partitions empty; the merge must weigh them 0, not NaN.
    generator = torch.Generator().manual_seed(num_splits * 10 + num_q_heads)
    batch = make_batch([1, 1, 1], [3, 150, 64], num_q_heads, num_kv_heads, 32, 16, dtype, generator)
    out = torch.full_like(batch.q, float("nan"))
    attention.paged_attention_with_splits(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.2,
        max_query_len=1, num_splits=num_splits, out=out,
    )
    assert relative_error(out, reference_attention(batch, 0.2)) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_decodes", [0, 2, 4])
def test_mixed_batch_with_decode_rows_first_in_their_own_launch(dtype: torch.dtype, num_decodes: int) -> None:
    # Decode rows first (the model runner's order), one long enough for split-KV; the launcher
    # runs the first num_decodes rows with decode tiles and the rest with prefill tiles. A
    # num_decodes short of the real prefix (2) only leaves decode rows to the prefill tiles.
    generator = torch.Generator().manual_seed(num_decodes)
    batch = make_batch([1, 1, 1, 1, 7, 20, 3], [9, 300, 33, 0, 0, 5, 40], 4, 2, 32, 16, dtype, generator)
    out = torch.full_like(batch.q, float("nan"))
    attention.paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.25,
        max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len, out=out, num_decodes=num_decodes,
    )
    assert relative_error(out, reference_attention(batch, 0.25)) <= TOLERANCE[dtype]


def test_seq_range_outside_the_batch_is_refused() -> None:
    batch = make_batch([1, 1], [4, 4], 2, 2, 16, 4, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="out of range"):
        attention.paged_attention_with_splits(
            batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc,
            0.5, max_query_len=1, num_splits=1, seqs=(1, 3))


@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES[1:],
                                   pytest.param(torch.float16, marks=pytest.mark.skipif(not CUDA, reason="needs CUDA"))])
@pytest.mark.parametrize("lens", [MIXED, DECODE, PREFILL], ids=["mixed", "decode", "prefill"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_fp8_cache_matches_dequantized_reference(dtype: torch.dtype, lens: tuple[list[int], list[int]],
                                                 num_splits: int) -> None:
    """fp8 K/V tiles are converted to q's dtype in the kernel (exact), scales applied outside the dots:
    the result is the reference over the dequantised caches (fp8 * scale)."""
    if num_splits > 1 and max(lens[0]) > 1:
        pytest.skip("split-KV is for decode batches")
    generator = torch.Generator().manual_seed(len(lens[0]) * 10 + num_splits)
    batch = make_batch(*lens, 8, 2, 32, 16, dtype, generator, cache_dtype=FP8_DTYPE)
    scale, k_scale, v_scale = 32**-0.5, 0.5, 2.0
    out = torch.full_like(batch.q, float("nan"))
    attention.paged_attention_with_splits(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale,
        max_query_len=batch.max_query_len, num_splits=num_splits, out=out, k_scale=k_scale, v_scale=v_scale,
    )
    ref = reference_attention(batch, scale, k_scale, v_scale)
    assert relative_error(out, ref) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_into_fp8_cache_saturates(dtype: torch.dtype) -> None:
    # NOTE: inputs are fp8 values times the scale (plus out-of-range ones): the Triton interpreter
    # rounds fp32 -> fp8 wrongly, so on CPU only exactly representable values are stored.
    generator = torch.Generator().manual_seed(9)
    num_blocks, block_size, num_kv_heads, head_dim, num_tokens = 4, 4, 2, 16, 7
    k_scale, v_scale = 4.0, 0.25
    kv = []
    for scale in (k_scale, v_scale):
        x = (torch.randn((num_tokens, num_kv_heads, head_dim), generator=generator) * 100).to(FP8_DTYPE).float()
        x[:, 0, :2] = torch.tensor([1e4, -1e4])  # saturate at ±448
        kv.append((x * scale).to(dtype).to(DEVICE))
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slots[1] = -1
    slots = slots.to(DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = [torch.full(shape, float("nan"), device=DEVICE).to(FP8_DTYPE) for _ in range(4)]
    attention.store_kv(*kv, caches[0], caches[1], slots, k_scale=k_scale, v_scale=v_scale)
    reference.store_kv_ref(*kv, caches[2], caches[3], slots, k_scale, v_scale)
    for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        stored = got.float()[~got.float().isnan().all(-1).all(-1)]
        assert stored.shape[0] == num_tokens - 1 and stored.abs().max() == 448.0


def test_fp8_launchers_reject_bad_scales_and_dtypes() -> None:
    generator = torch.Generator().manual_seed(0)
    b = make_batch([1], [3], 4, 2, 16, 4, torch.float32, generator, cache_dtype=FP8_DTYPE)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.query_start_loc, 0.5)
    with pytest.raises(ValueError, match="k_scale"):
        attention.paged_attention(*args, max_query_len=1, max_seq_len=4, k_scale=-1.0)
    with pytest.raises(TypeError, match="caches must both be"):
        attention.paged_attention(b.q, b.k_cache, b.v_cache.float(), *args[3:], max_query_len=1, max_seq_len=4)
    plain = make_batch([1], [3], 4, 2, 16, 4, torch.float32, generator)
    with pytest.raises(ValueError, match="fp8 cache only"):
        attention.paged_attention(plain.q, plain.k_cache, plain.v_cache, *args[3:], max_query_len=1, max_seq_len=4,
                                  v_scale=2.0)
    k = torch.zeros((1, 2, 16), device=DEVICE)
    with pytest.raises(ValueError, match="fp8 cache only"):
        attention.store_kv(k, k, plain.k_cache, plain.v_cache, torch.zeros(1, dtype=torch.int64, device=DEVICE),
                           k_scale=2.0)


def test_decode_launcher_picks_split_kv_for_few_long_sequences() -> None:
    assert attention.choose_num_splits(1, 8, 4096, DEVICE) > 1
    assert attention.choose_num_splits(512, 8, 4096, DEVICE) == 1  # the grid is already full
    assert attention.choose_num_splits(1, 8, 64, DEVICE) == 1  # too short to be worth a merge


def test_decode_only_batch_through_public_launcher() -> None:
    # Long enough context that the launcher splits (see the test above), through the public entry.
    generator = torch.Generator().manual_seed(7)
    batch = make_batch([1], [300], 4, 2, 16, 16, torch.float32, generator)
    out = attention.paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, 0.25,
        max_query_len=1, max_seq_len=301, is_decode_only=True,
    )
    assert relative_error(out, reference_attention(batch, 0.25)) <= 1e-4


def test_padding_rows_without_tokens_are_skipped() -> None:
    # A CUDA-graph batch padded with empty sequences (q_len 0, seq_len 0) must still be right.
    generator = torch.Generator().manual_seed(3)
    batch = make_batch([1, 1], [5, 20], 2, 1, 16, 4, torch.float32, generator)
    pad = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    seq_lens = torch.cat([batch.seq_lens, pad])
    starts = torch.cat([batch.query_start_loc, batch.query_start_loc[-1:].repeat(2)])
    tables = torch.cat([batch.block_tables, torch.zeros_like(batch.block_tables)])
    ref = reference_attention(batch, 0.3)
    for splits in (1, 4):
        out = attention.paged_attention_with_splits(batch.q, batch.k_cache, batch.v_cache, tables, seq_lens, starts,
                                                    0.3, max_query_len=1, num_splits=splits)
        assert relative_error(out, ref) <= 1e-4


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [4, 16])
def test_store_kv_writes_slots_and_skips_padding(dtype: torch.dtype, block_size: int) -> None:
    generator = torch.Generator().manual_seed(block_size)
    num_blocks, num_kv_heads, head_dim, num_tokens = 6, 2, 16, 9
    # k/v as views of a fused qkv projection: the token stride is not Hkv * D.
    qkv = torch.randn((num_tokens, 5, num_kv_heads, head_dim), generator=generator).to(dtype).to(DEVICE)
    k, v = qkv[:, 1], qkv[:, 3]
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    slots[[2, 5]] = -1  # padding tokens
    slots = slots.to(DEVICE)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    attention.store_kv(k, v, k_cache, v_cache, slots)
    reference.store_kv_ref(k, v, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_ref, equal_nan=True, rtol=0, atol=0)
    assert int((~k_cache.isnan()).all(-1).all(-1).sum()) == num_tokens - 2  # padding left untouched


def test_launcher_rejects_bad_inputs() -> None:
    generator = torch.Generator().manual_seed(0)
    b = make_batch([2], [3], 4, 2, 16, 4, torch.float32, generator)
    args = (b.k_cache, b.v_cache, b.block_tables, b.seq_lens, b.query_start_loc, 0.5)
    kwargs = {"max_query_len": 2, "max_seq_len": 5}
    with pytest.raises(ValueError, match="multiple"):
        attention.paged_attention(b.q[:, :3], *args, **kwargs)
    with pytest.raises(ValueError, match="seq_lens"):
        attention.paged_attention(b.q, b.k_cache, b.v_cache, b.block_tables, b.seq_lens.long(),
                                  b.query_start_loc, 0.5, **kwargs)
    with pytest.raises(TypeError, match="float64"):
        attention.paged_attention(b.q.double(), *args, **kwargs)
    with pytest.raises(ValueError, match="decode"):
        attention.paged_attention_with_splits(b.q, *args, max_query_len=2, num_splits=2)
    with pytest.raises(ValueError, match="sliding_window"):
        attention.paged_attention(b.q, *args, **kwargs, sliding_window=0)
    with pytest.raises(ValueError, match="slot_mapping"):
        attention.store_kv(b.q[:, :2], b.q[:, :2], b.k_cache, b.v_cache, torch.zeros(1, dtype=torch.int64))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_decode_attention_replays_in_a_cuda_graph() -> None:
    # Captured with one set of lengths, replayed with another: the kernel must read lengths on device.
    generator = torch.Generator().manual_seed(11)
    batch = make_batch([1, 1], [40, 200], 8, 2, 128, 16, torch.bfloat16, generator)
    seq_lens = batch.seq_lens.clone()
    out = torch.empty_like(batch.q)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, seq_lens, batch.query_start_loc, 0.1)
    attention.paged_attention(*args, max_query_len=1, max_seq_len=512, is_decode_only=True, out=out)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention.paged_attention(*args, max_query_len=1, max_seq_len=512, is_decode_only=True, out=out)
    seq_lens.copy_(torch.tensor([17, 150], dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    shorter = PagedBatch(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, seq_lens,
                         batch.query_start_loc, 1, 150)
    assert relative_error(out, reference_attention(shorter, 0.1)) <= 1e-2


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_sliding_window_decode_replays_in_a_cuda_graph() -> None:
    # As above, with a window: the split count comes from the window, never from live lengths.
    generator = torch.Generator().manual_seed(12)
    batch = make_batch([1, 1], [300, 900], 8, 2, 128, 16, torch.bfloat16, generator)
    seq_lens = batch.seq_lens.clone()
    out = torch.empty_like(batch.q)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.block_tables, seq_lens, batch.query_start_loc, 0.1)
    kwargs = {"max_query_len": 1, "max_seq_len": 1024, "is_decode_only": True, "out": out, "sliding_window": 256}
    attention.paged_attention(*args, **kwargs)  # compile
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention.paged_attention(*args, **kwargs)
    seq_lens.copy_(torch.tensor([180, 700], dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    shorter = PagedBatch(batch.q, batch.k_cache, batch.v_cache, batch.block_tables, seq_lens,
                         batch.query_start_loc, 1, 700)
    assert relative_error(out, reference_attention(shorter, 0.1, sliding_window=256)) <= 1e-2


@pytest.mark.parametrize(("text", "want"), [("", 16), (" ", 16), ("1", 1), ("64", 64)])
def test_max_decode_splits_from_env(monkeypatch: pytest.MonkeyPatch, text: str, want: int) -> None:
    monkeypatch.setenv(attention.ENV_MAX_SPLITS, text)
    assert attention.max_splits_from_env(default=16) == want


@pytest.mark.parametrize("text", ["0", "48", "-4", "many"])
def test_max_decode_splits_from_env_refuses_nonsense(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(attention.ENV_MAX_SPLITS, text)
    with pytest.raises(ValueError, match="APPLIANCE_MAX_DECODE_SPLITS='.*': expected a power of two"):
        attention.max_splits_from_env(default=16)


def test_the_split_cap_follows_the_longest_row(monkeypatch: pytest.MonkeyPatch) -> None:
    # One 32k-token row of 8 KV heads wants 33 partitions (two waves of 132 SMs): the cap decides,
    # and the cap depends on the batch's longest row: 16 under LONG_ROW_KEYS keys, 64 from there.
    long = attention.LONG_ROW_KEYS
    assert attention.choose_num_splits(1, 8, 32768, DEVICE) == 64
    assert attention.choose_num_splits(1, 8, long, DEVICE) == 64
    assert attention.choose_num_splits(1, 8, long - 1, DEVICE) == 16
    assert attention.choose_num_splits(1, 8, 4096, DEVICE) == 16  # 4,096 keys could take 32 of 128
    assert attention.choose_num_splits(2, 8, 32768, DEVICE) == 32  # 17 wanted -> the next power of two
    assert attention.choose_num_splits(8, 8, 32768, DEVICE) == 8  # 64 programs: a few splits fill the GPU
    monkeypatch.setattr(attention, "_MAX_LONG_SPLITS", 16)  # APPLIANCE_MAX_DECODE_SPLITS=16
    assert attention.choose_num_splits(1, 8, 32768, DEVICE) == 16
    monkeypatch.setattr(attention, "_MAX_SPLITS", 64)
    assert attention.choose_num_splits(1, 8, 4096, DEVICE) == 32
