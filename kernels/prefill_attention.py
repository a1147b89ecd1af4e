"""Long-prompt prefill attention over the paged KV cache, shaped for Hopper (torch reference:
kernels/reference.py `paged_attention_ref`).

The mixed-batch kernel (kernels/attention.py) masks every key tile and keeps 64-row tiles so that
decode rows waste little; on an H100 it runs 130-145 TFLOP/s on prefill, ~18% of the bf16 matmul
rate. For chunked prefill of long prompts this kernel:
- takes bigger tiles (TILE: 128 rows of (token x GQA head) by 64 keys, 8 warps, 3 stages), so each
  K/V tile feeds twice the MMA work per load and the loads of the next tiles are in flight
  (software pipelining: Triton's num_stages over the key loop);
- splits the key loop into three ranges per tile: keys some rows of the tile cannot see because
  of the sliding window (masked), keys every row sees (the bulk of a long context: whole key
  tiles, so no causal mask, no bounds check on the loads, no -inf guard, and the softmax scale
  folded into the exp2's argument), and the diagonal, where causality cuts through the tile
  (masked). Only the first and last cost mask work, a few tiles per program;
- accumulates P @ V into the accumulator operand of the dot (one wgmma chain, no extra add);
- reads the block table once per key tile (one gather of block ids), one tile ahead of the K/V
  loads that use it, so Triton pipelines the paged K/V loads num_stages deep (a load whose address
  comes from a load of the same iteration kept it at two buffers and a full wait per tile);
- launches the heaviest programs first: the grid is (kv head, sequence, query tile) with the
  query tiles in reverse, so the last tiles of a long causal chunk (which see the most keys) start
  in the first wave instead of trailing alone in the last, and the programs running together
  share their heads' K/V in L2.

TMA (tile option "tma"): a paged cache's key tile is a gather of `block_size`-row pages, and
Hopper's TMA loads boxes from one tensor map (its row gather is Blackwell's). When a page holds
whole key tiles (block_size a multiple of BLOCK_N, e.g. `engine.block_size = 64`), each K and V
tile is one box of a device-side tensor descriptor over the cache viewed as [slots, Hkv * D];
key ranges then start on tile boundaries (a tile never straddles two pages, and the page of a
window's first key is never a released one). With 16-token pages the gather path runs; the sweep
(bench/longctx.py) measures both. Triton's automatic warp specialization
(`tl.range(..., warp_specialize=True)`) is Blackwell-only by its own documentation (3.6/3.7).

The kernel handles sequences [seq_start, seq_end) of a batch whose rows are all prefill chunks
(q_len >= 1, any context before them); the launcher in attention.py sends it the prefill part of
a mixed batch when the chunk is long (`LONG_PREFILL_MIN_QUERY_TOKENS`).
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl
from appliance_kernels.fp8 import is_fp8
from appliance_kernels.intmath import cdiv, next_power_of_2

# Environment overrides, read once at import (the engine captures CUDA graphs with whatever the
# launcher chooses then, so a later change could not reach them; a bad value fails the import):
#   APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS=N  prefill launches whose longest chunk has >= N tokens
#       take this kernel (attention.LONG_PREFILL_MIN_QUERY_TOKENS); "off" = never. Unset: the
#       constant in attention.py.
#   APPLIANCE_PREFILL_TILE='{"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}'  TILE
#       (JSON; "tma": 1 as well only where every page holds whole key tiles, engine.block_size 64+).
# bench/longctx.py's engine phase starts the daemon with them, to serve with the kernel on in the
# same GPU call that measured it.
ENV_MIN_QUERY_TOKENS = "APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS"
ENV_TILE = "APPLIANCE_PREFILL_TILE"
_TILE_KEYS = {"rows", "block_n", "num_warps", "num_stages"}


def min_query_tokens_from_env(default: int | None) -> int | None:
    """$APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS as attention.py's switch: an int >= 1, or "off"
    (None); `default` when unset or empty."""
    text = os.environ.get(ENV_MIN_QUERY_TOKENS, "").strip()
    if not text:
        return default
    if text.lower() in ("off", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"${ENV_MIN_QUERY_TOKENS}={text!r}: expected an integer >= 1 or 'off'")
    return value


def check_tile(tile: dict[str, int], where: str) -> dict[str, int]:
    """A tile dict as launch_prefill takes it, or ValueError naming `where`."""
    if not isinstance(tile, dict) or not _TILE_KEYS <= tile.keys() or not tile.keys() <= _TILE_KEYS | {"tma"}:
        raise ValueError(f"{where}: a prefill tile is a JSON object with keys {sorted(_TILE_KEYS)} "
                         f"(and optionally 'tma'), got {tile!r}")
    for key, value in tile.items():
        ok = isinstance(value, int) and not isinstance(value, bool)
        if key == "tma":
            ok = ok and value in (0, 1)
        elif key == "num_stages":
            ok = ok and value >= 1
        else:  # rows, block_n, num_warps: powers of two (tile shapes, warps per program)
            ok = ok and value >= (1 if key == "num_warps" else 16) and value & (value - 1) == 0
        if not ok:
            raise ValueError(f"{where}: tile[{key!r}] = {value!r} is out of range (rows and block_n: powers of "
                             "two >= 16, num_warps: a power of two, num_stages >= 1, tma: 0 or 1)")
    return dict(tile)


def tile_from_env(default: dict[str, int]) -> dict[str, int]:
    """$APPLIANCE_PREFILL_TILE (JSON) as TILE; `default` when unset or empty."""
    text = os.environ.get(ENV_TILE, "").strip()
    if not text:
        return dict(default)
    try:
        tile = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"${ENV_TILE}: not JSON ({exc}): {text!r}") from None
    return check_tile(tile, f"${ENV_TILE}")


# TILE: the tile for an H100/H200 with head_dim 128 (FlashAttention-2/3's forward shape),
# chosen by the sweep (bench/longctx.py tries SWEEP_TILES around it). Compiled offline for
# sm_90a with Triton 3.6 and 3.7 (`python -m appliance_bench.longctx --phase compile`, ptxas -v):
# 128 x 64 on 8 warps, 3 stages: ~185 registers, no spill, 128 KiB of shared memory (3 K/V
# buffers, the next tile loading while a tile is computed; 4 stages: 160 KiB, two); 128 x 128 on 8 warps: 255 registers,
# ~25 B spilled, 160 KiB (2 stages) / 224 KiB (3). 128-row tiles on 4 warps, 64 x 128 on 4 warps and
# 256-row tiles spill more, so the sweep leaves them out.
# Measured on an H200 (bench/results/2026-12-01-nvidia-h200-07eace5-longctx.json), 8k chunks at
# 0 / 8k / 24k context: this tile 452 / 470 / 441 TFLOP/s, 128 x 128 (8 warps, 3 stages) 450 / 458 /
# 466. The sweep picked 128 x 128 and the engine's long-context run used it; this one stays the
# default because it spills nothing and keeps a tile in flight (128 x 128: 28 B spilled, none).
DEFAULT_TILE = {"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}
TILE = tile_from_env(DEFAULT_TILE)
SWEEP_TILES = [
    {"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
    {"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 4},
    {"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 2},
    {"rows": 128, "block_n": 128, "num_warps": 8, "num_stages": 2},
    {"rows": 128, "block_n": 128, "num_warps": 8, "num_stages": 3},
    {"rows": 128, "block_n": 32, "num_warps": 8, "num_stages": 4},
    {"rows": 64, "block_n": 64, "num_warps": 4, "num_stages": 3},
]


@triton.jit
def _tile_block_ids(block_table_row, start, hi, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                    USE_TMA: tl.constexpr):
    """The block ids of the key tile at `start` (keys past hi: 0, never read): one per key, or
    with TMA (the tile inside one page) the page's alone."""
    # NOTE: one return (a constexpr branch that returns early still types both returns together).
    if USE_TMA:
        ids = tl.load(block_table_row + start // PAGE_SIZE, mask=start < hi, other=0)
    else:
        keys = start + tl.arange(0, BLOCK_N)
        ids = tl.load(block_table_row + keys // PAGE_SIZE, mask=keys < hi, other=0)
    return ids


@triton.jit
def _attend_keys(
    acc, l_i, m_i, q, q_pos, lo, hi, window,
    k_cache_ptr, v_cache_ptr, k_desc, v_desc, block_table_row, kv_head, scale_log2,
    dims, dim_valid,
    HEAD_DIM: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    MASKED: tl.constexpr, SLIDING: tl.constexpr, IEEE_FP32: tl.constexpr, IS_FP8: tl.constexpr,
    USE_TMA: tl.constexpr, EVEN_D: tl.constexpr,
):
    """Online softmax over keys [lo, hi).

    MASKED: apply causality (and the window) per element, keys past hi included. Else the caller
    guarantees that hi - lo is a multiple of BLOCK_N and that every row sees every key of the
    range: no mask, no bounds check and no -inf guard in the loop (the bulk of a long context).
    USE_TMA: lo is a multiple of BLOCK_N and each tile is one box of k_desc / v_desc.
    EVEN_D: HEAD_DIM is a power of two (>= 16): no mask on the head dims either."""
    row_elems = NUM_KV_HEADS * HEAD_DIM
    # The block ids of each key tile are loaded one tile ahead and carried: a K/V address that
    # depends on a load of its own iteration keeps Triton's software pipeliner at two K/V buffers
    # and a wait for every copy in flight (ptxas/TTGIR of sm_90a, Triton 3.6 and 3.7); carried,
    # it gets num_stages buffers and loads num_stages - 1 tiles ahead, as with a contiguous cache.
    next_ids = _tile_block_ids(block_table_row, lo, hi, BLOCK_N, PAGE_SIZE, USE_TMA)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < hi
        block_ids = next_ids
        next_ids = _tile_block_ids(block_table_row, start + BLOCK_N, hi, BLOCK_N, PAGE_SIZE, USE_TMA)
        if USE_TMA:
            row0 = block_ids * PAGE_SIZE + start % PAGE_SIZE
            k = k_desc.load([row0, kv_head * HEAD_DIM])  # [N, D]; rows past hi: other slots, masked below
        else:
            key_offs = (block_ids.to(tl.int64) * PAGE_SIZE + keys % PAGE_SIZE) * row_elems + kv_head * HEAD_DIM
            kv_ptrs = key_offs[:, None] + dims[None, :]
            if MASKED:
                kv_mask = key_valid[:, None] & dim_valid[None, :]
                k = tl.load(k_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)  # [N, D]
            elif EVEN_D:
                k = tl.load(k_cache_ptr + kv_ptrs)
            else:
                k = tl.load(k_cache_ptr + kv_ptrs, mask=dim_valid[None, :], other=0.0)
        if IS_FP8:
            k = k.to(q.dtype)
        if IEEE_FP32:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        if MASKED:
            visible = key_valid[None, :] & (keys[None, :] <= q_pos[:, None])
            if SLIDING:
                visible = visible & (keys[None, :] > q_pos[:, None] - window)
            qk = tl.where(visible, qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no visible key yet keeps m = -inf; shift it by 0 to avoid inf - inf.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(qk - m_shift[:, None])
        else:
            # Every row sees a key here, so m_new is finite; scale and shift in one FMA.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_shift = m_new
            p = tl.exp2(qk * scale_log2 - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = v_desc.load([row0, kv_head * HEAD_DIM])
            if MASKED:  # a slot past hi may hold anything (NaN included): 0 * NaN would poison acc
                v = tl.where(key_valid[:, None], v, 0.0)
        elif MASKED:
            v = tl.load(v_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)  # [N, D]
        elif EVEN_D:
            v = tl.load(v_cache_ptr + kv_ptrs)
        else:
            v = tl.load(v_cache_ptr + kv_ptrs, mask=dim_valid[None, :], other=0.0)
        if IS_FP8:
            v = v.to(q.dtype)
        if IEEE_FP32:
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


# NOTE: no specialization on the table stride, the sequence offset or the window (see attention.py).
@triton.jit(do_not_specialize=["stride_bt", "seq_offset", "window", "num_slots"])
def _prefill_attention_kernel(
    out_ptr,  # [T, Hq, D]
    q_ptr,  # [T, Hq, D], dims packed
    k_cache_ptr,  # [N, BS, Hkv, D] contiguous
    v_cache_ptr,  # [N, BS, Hkv, D] contiguous
    block_tables_ptr,  # int32 [B, max_blocks]; entries before every window may be -1 (never read)
    seq_lens_ptr,  # int32 [B]; context length including this step's tokens
    query_start_loc_ptr,  # int32 [B + 1]
    scale_log2,  # softmax scale * k_scale * log2(e)
    v_scale,  # fp8 caches: applied to the output
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_bt,
    seq_offset,  # program_id(1) + seq_offset = the sequence
    window,  # SLIDING: keys per query, itself included
    num_slots,  # N * BS: the rows of the caches viewed as [slots, Hkv * D] (USE_TMA)
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program = BLOCK_Q * GROUP_PAD; row = token * GROUP_PAD + head
    BLOCK_N: tl.constexpr,  # keys per iteration
    PAGE_SIZE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    IS_FP8: tl.constexpr,
    SLIDING: tl.constexpr,
    USE_TMA: tl.constexpr,  # PAGE_SIZE % BLOCK_N == 0 and BLOCK_D == HEAD_DIM: K/V tiles as TMA boxes
    EVEN_D: tl.constexpr,  # BLOCK_D == HEAD_DIM: no mask on the head dims
):
    kv_head = tl.program_id(0)
    seq = tl.program_id(1) + seq_offset
    q_tile = tl.num_programs(2) - 1 - tl.program_id(2)  # heaviest (last) tiles first
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile_first = q_tile * BLOCK_Q
    # The grid covers the batch's longest chunk: a tile past this one's end sees no key (empty
    # ranges below) and stores nothing (row_valid), like the mixed-batch kernel's empty tiles.
    tile_valid = tile_first < q_len
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len
    tile_last = tl.minimum(q_len, tile_first + BLOCK_Q) - 1

    rows = tl.arange(0, BLOCK_M)
    tok = tile_first + rows // GROUP_PAD
    head_in_group = rows % GROUP_PAD
    row_valid = (tok < q_len) & (head_in_group < GROUP)
    q_head = kv_head * GROUP + head_in_group
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_t + q_head[:, None] * stride_q_h + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    q_pos = ctx_len + tok

    # Key ranges (module docstring): [kv_lo, b_lo) masked, [b_lo, b_hi) unmasked, [b_hi, kv_hi) masked.
    kv_hi = tl.where(tile_valid, ctx_len + tile_last + 1, 0)
    kv_lo = 0
    seen_by_all_lo = 0  # the first key every row of the tile sees
    if SLIDING:
        kv_lo = tl.maximum(ctx_len + tile_first - window + 1, 0)
        seen_by_all_lo = tl.maximum(ctx_len + tile_last - window + 1, 0)
        if USE_TMA:  # whole tiles: back to the tile start, in the same (live) page as kv_lo
            kv_lo = kv_lo // BLOCK_N * BLOCK_N
    seen_by_all_hi = tl.minimum(ctx_len + tile_first, kv_hi)  # causally, all rows see the keys before the first
    b_lo = kv_lo + tl.cdiv(seen_by_all_lo - kv_lo, BLOCK_N) * BLOCK_N
    b_hi = b_lo + tl.maximum(seen_by_all_hi - b_lo, 0) // BLOCK_N * BLOCK_N
    a_hi = tl.minimum(b_lo, kv_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_desc = None
    v_desc = None
    if USE_TMA:
        row_elems: tl.constexpr = NUM_KV_HEADS * HEAD_DIM
        k_desc = tl.make_tensor_descriptor(k_cache_ptr, shape=[num_slots, row_elems], strides=[row_elems, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_cache_ptr, shape=[num_slots, row_elems], strides=[row_elems, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, kv_lo, a_hi, window, k_cache_ptr, v_cache_ptr, k_desc,
                                 v_desc, block_table_row, kv_head, scale_log2, dims, dim_valid, HEAD_DIM,
                                 NUM_KV_HEADS, BLOCK_N, PAGE_SIZE, True, SLIDING, IEEE_FP32, IS_FP8, USE_TMA, EVEN_D)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, b_lo, b_hi, window, k_cache_ptr, v_cache_ptr, k_desc,
                                 v_desc, block_table_row, kv_head, scale_log2, dims, dim_valid, HEAD_DIM,
                                 NUM_KV_HEADS, BLOCK_N, PAGE_SIZE, False, SLIDING, IEEE_FP32, IS_FP8, USE_TMA, EVEN_D)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, q_pos, tl.maximum(b_hi, a_hi), kv_hi, window, k_cache_ptr,
                                 v_cache_ptr, k_desc, v_desc, block_table_row, kv_head, scale_log2, dims, dim_valid,
                                 HEAD_DIM, NUM_KV_HEADS, BLOCK_N, PAGE_SIZE, True, SLIDING, IEEE_FP32, IS_FP8,
                                 USE_TMA, EVEN_D)
    if IS_FP8:
        acc = acc * v_scale
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_o_t + q_head[:, None] * stride_o_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


def launch_prefill(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    seq_lens: torch.Tensor,  # int32 [B]
    query_start_loc: torch.Tensor,  # int32 [B + 1]
    scale: float,
    out: torch.Tensor,  # [T, Hq, D]
    k_scale: float,
    v_scale: float,
    sliding_window: int | None,
    *,
    max_query_len: int,
    seq_start: int,
    seq_end: int,
    tile: dict[str, int] | None = None,
) -> None:
    """The launch for sequences [seq_start, seq_end); inputs already checked by attention.py's
    launchers (`paged_attention`, `paged_attention_with_splits`)."""
    tile = tile or TILE
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    block_d = max(16, next_power_of_2(head_dim))
    # A GQA group never spans two programs; past 128 dims (Gemma 3: 256) the row and key tiles
    # halve, so the fp32 accumulator (rows x head_dim) stays within the registers of 128 x 128.
    rows = tile["rows"] if head_dim <= 128 else max(16, tile["rows"] // 2)
    block_q = max(1, rows // group_pad)
    block_m = max(16, block_q * group_pad)
    block_n = tile["block_n"] if head_dim <= 128 else max(16, tile["block_n"] // 2)
    use_tma = bool(tile.get("tma")) and page_size % block_n == 0 and block_d == head_dim
    if tile.get("tma") and not use_tma:
        raise ValueError(f"prefill tile {tile}: TMA needs block_size ({page_size}) a multiple of the key tile "
                         f"({block_n}) and a power-of-two head size (got {head_dim})")
    if use_tma and q.is_cuda:
        _ensure_tma_allocator()
    scale_log2 = float(scale) * float(k_scale) * 1.4426950408889634
    grid = (num_kv_heads, seq_end - seq_start, cdiv(max_query_len, block_q))
    _prefill_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale_log2, float(v_scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), seq_start,
        sliding_window or 0, k_cache.shape[0] * page_size,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, GROUP_PAD=group_pad,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=page_size,
        IEEE_FP32=q.dtype == torch.float32, IS_FP8=is_fp8(k_cache), SLIDING=sliding_window is not None,
        USE_TMA=use_tma, EVEN_D=block_d == head_dim, num_warps=tile["num_warps"], num_stages=tile["num_stages"],
    )


_tma_allocator_set = False


def _ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need global scratch memory from an allocator Triton calls at
    launch: torch's caching allocator (graph-capture safe: it draws from the graph's pool)."""
    global _tma_allocator_set
    if not _tma_allocator_set:
        def alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
            return torch.empty(size, dtype=torch.int8, device="cuda")

        triton.set_allocator(alloc)
        _tma_allocator_set = True
