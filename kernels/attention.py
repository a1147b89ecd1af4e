"""Paged attention and KV-cache writes in Triton (torch references: kernels/reference.py).

One launch of `paged_attention` serves a mixed batch: decode rows (one new token) and
chunked-prefill rows (many new tokens, causal against the whole paged context, earlier chunks and
prefix-cache hits included). Each program owns one kv head of one tile of query tokens and holds
every query head of that kv head's GQA group as extra rows of its tile, so each K/V tile is read
once per group rather than once per query head. Softmax is online (running max and sum, fp32).

Decode with few sequences and long contexts leaves most of the GPU idle when one program walks the
whole context, so the launcher then splits the context into partitions (flash-decoding): each
program reduces one partition to a partial (unnormalised output, max, sum) and a second kernel
merges the partials. (Merging in the last partition to finish, found by an atomic counter, saved
that launch but cost more than it: 7.1 us against 4.1 + 2.0 us per layer at batch 1 on an H100.)

Sliding windows (a per-layer setting, `sliding_window` = W keys per query including itself): a row
at position p sees keys p - W < key <= p. A tile starts its key loop at its first row's window
start, so keys before every window of the tile are neither read nor masked, and block-table
entries there (freed by the block manager: -1) are never dereferenced; split-KV partitions divide
only the window. Rows of one tile still differ in their window start, so the window is also a
mask (SLIDING, a constexpr: full-attention launches pay nothing for it).

FP8 caches (float8_e4m3fn, kernels/fp8.py): store_kv saturates x / scale into them; attention loads
fp8 K/V tiles, converts them to q's dtype (exact: every e4m3 value is a bf16/fp16 value) before
tl.dot, and applies the per-tensor scales outside the dots (k_scale folded into the softmax scale,
v_scale on the output), which equals dequantising every element with one scale.

NOTE: the launchers never synchronise and never read device tensors on the host: the model runner
captures them into CUDA graphs for decode. The grid depends only on tensor shapes and the host ints
`max_query_len` / `max_seq_len`; per-sequence lengths are read on the device.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from appliance_kernels.checks import check_out, check_same_device
from appliance_kernels.fp8 import FP8_DTYPE, check_kv_scales, is_fp8, to_cache
from appliance_kernels.intmath import cdiv, next_power_of_2
from appliance_kernels.prefill_attention import launch_prefill, min_query_tokens_from_env

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Split-KV: never give a partition fewer keys than this, and never more partitions than the cap
# for the batch's longest row: _MAX_SPLITS under LONG_ROW_KEYS keys, _MAX_LONG_SPLITS from there.
_MIN_KEYS_PER_SPLIT = 128
_MAX_SPLITS = 16
LONG_ROW_KEYS = 8192
ENV_MAX_SPLITS = "APPLIANCE_MAX_DECODE_SPLITS"


def max_splits_from_env(default: int) -> int:
    """$APPLIANCE_MAX_DECODE_SPLITS: the most partitions a split-KV decode row takes when the
    batch's longest row has LONG_ROW_KEYS keys or more (a power of two >= 1), `default` when unset.
    Measured on an H200 (bench/results/...-07eace5-longctx.json): one 32k-token row reads 1.97 TB/s
    with 16 partitions and 3.42 with 64 (131k: 2.15 -> 4.10). Shorter batches keep the cap of 16:
    the model runner captures a second decode graph for the small batches whose partitions differ
    (appliance/engine/model_runner.py, "long-row graphs"), so short rows replay what they did."""
    text = os.environ.get(ENV_MAX_SPLITS, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or value & (value - 1):
        raise ValueError(f"${ENV_MAX_SPLITS}={text!r}: expected a power of two >= 1")
    return value


_MAX_LONG_SPLITS = max_splits_from_env(default=64)
# Decode tile shapes (keys per iteration, warps, pipeline stages), by cache dtype, from a sweep on
# an H100 (bench/results/...-decode-tile-sweep.json): bf16 at B=512 ctx=640 reads 2.97 TB/s with
# 64/4/2 (no shape is faster); fp8 tiles convert before the dots, and 128 keys per iteration take
# B=512 ctx=640 from 375 to 320 us (1.79 -> 2.10 TB/s) and B=1 ctx=4096 from 13.6 to 11.8 us.
DECODE_TILE = {"block_n": 64, "num_warps": 4, "num_stages": 2}
DECODE_TILE_FP8 = {"block_n": 128, "num_warps": 4, "num_stages": 2}
# Prefill/mixed tile shape (rows = query tokens x GQA heads per program). A sweep on an H100
# (16 x 512-token causal prefills, Llama-3.1-8B heads) found 130-145 TFLOP/s for every shape
# tried; 128 rows x 32 keys was 11% faster than this one but doubles the idle rows of the decode
# rows in mixed batches, so this one stays.
PREFILL_TILE = {"rows": 64, "block_n": 64, "num_warps": 4, "num_stages": 2}
# Prefill launches whose longest chunk has at least this many tokens go to the Hopper-shaped
# prefill kernel (kernels/prefill_attention.py). 2048: on an H200 (bench/results/2026-12-01-
# nvidia-h200-07eace5-longctx.json) that kernel wins from 2,048-token chunks on in every measured
# case (1.46-1.70x this file's kernel at 8k-32k context, 440-491 TFLOP/s, 57-64% of the measured
# bf16 matmul rate) and loses at 16 x 512 (0.78x); the engine served 32x8k + 8x32k at 25,435
# against 22,498 total tok/s with it off. $APPLIANCE_LONG_PREFILL_MIN_QUERY_TOKENS (N or "off"),
# read once at import, overrides it.
LONG_PREFILL_MIN_QUERY_TOKENS: int | None = min_query_tokens_from_env(default=2048)


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [T, Hkv, D] (token stride free, heads and dims packed)
    v_ptr,  # [T, Hkv, D]
    k_cache_ptr,  # [N, BS, Hkv, D] contiguous
    v_cache_ptr,  # [N, BS, Hkv, D] contiguous
    slot_mapping_ptr,  # int32/int64 [T]; -1 = padding token, not stored
    k_scale,  # fp8 caches: stored = x / scale
    v_scale,
    stride_k_t,
    stride_v_t,
    ROW_ELEMS: tl.constexpr,  # Hkv * D
    BLOCK: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # A padding token (slot -1) stores nothing: fold it into the mask instead of branching.
    mask = (offs < ROW_ELEMS) & (slot >= 0)
    dst = tl.maximum(slot, 0) * ROW_ELEMS + offs
    k = tl.load(k_ptr + token * stride_k_t + offs, mask=mask)
    v = tl.load(v_ptr + token * stride_v_t + offs, mask=mask)
    tl.store(k_cache_ptr + dst, to_cache(k, k_scale, IS_FP8).to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, to_cache(v, v_scale, IS_FP8).to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]
    slot_mapping: torch.Tensor,  # int64 [T]; -1 marks a padding token that is not stored
    *,
    k_scale: float = 1.0,  # fp8 caches only: stored = clamp(x / scale, ±448)
    v_scale: float = 1.0,
) -> None:
    """Write this step's K/V rows into their cache slots (in place)."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"store_kv: k and v must both be [T, Hkv, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"store_kv: caches must both be [N, BS, Hkv, D], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    num_tokens, num_kv_heads, head_dim = k.shape
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"store_kv: k is {tuple(k.shape)} but the cache rows are {tuple(k_cache.shape[2:])}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"store_kv: slot_mapping must be int32/int64 [{num_tokens}], got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError(f"store_kv: {name} must have packed heads and dims (strides [*, {head_dim}, 1]), "
                             f"got {t.stride()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and slot_mapping.is_contiguous()):
        raise ValueError("store_kv: k_cache, v_cache and slot_mapping must be contiguous")
    check_cache_dtypes("store_kv", k, k_cache, v_cache)
    check_kv_scales("store_kv", k_cache, k_scale, v_scale)
    check_same_device("store_kv", k, v, k_cache, v_cache, slot_mapping)
    if num_tokens == 0:
        return
    row_elems = num_kv_heads * head_dim
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, float(k_scale), float(v_scale), k.stride(0), v.stride(0),
        ROW_ELEMS=row_elems, BLOCK=next_power_of_2(row_elems), IS_FP8=is_fp8(k_cache), num_warps=4,
    )


def check_cache_dtypes(op: str, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Both caches share one dtype: x's own (bf16/fp16/fp32), or fp8 e4m3."""
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: inputs must be float16, bfloat16 or float32, got {x.dtype}")
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in (x.dtype, FP8_DTYPE):
        raise TypeError(f"{op}: caches must both be {x.dtype} or both {FP8_DTYPE}, got {k_cache.dtype} / "
                        f"{v_cache.dtype}")


# NOTE: the block-table row stride is the step's widest table, which changes from step to step;
# Triton would otherwise compile a variant for each new "== 1 / divisible by 16" case mid-serving.
@triton.jit(do_not_specialize=["stride_bt", "seq_offset", "window"])
def _paged_attention_kernel(
    out_ptr,  # [T, Hq, D]; written when NUM_SPLITS == 1
    part_acc_ptr,  # fp32 [T, Hq, NUM_SPLITS, BLOCK_D]; unnormalised partial outputs (NUM_SPLITS > 1)
    part_max_ptr,  # fp32 [T, Hq, NUM_SPLITS]; running max of each partition, log2 units
    part_sum_ptr,  # fp32 [T, Hq, NUM_SPLITS]; softmax denominator of each partition
    q_ptr,  # [T, Hq, D], dims packed
    k_cache_ptr,  # [N, BS, Hkv, D] contiguous
    v_cache_ptr,  # [N, BS, Hkv, D] contiguous
    block_tables_ptr,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]; context length including this step's tokens
    query_start_loc_ptr,  # int32 [B + 1]
    scale_log2,  # softmax scale * k_scale * log2(e): the kernel works in base 2
    v_scale,  # fp8 caches: applied to the output (1.0 otherwise)
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_bt,
    seq_offset,  # program_id(0) + seq_offset = the sequence (a launch may cover a range of them)
    window,  # SLIDING: keys per query, itself included
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # HEAD_DIM rounded up to a power of two
    GROUP: tl.constexpr,  # query heads per kv head
    GROUP_PAD: tl.constexpr,  # GROUP rounded up to a power of two
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows per program: max(16, BLOCK_Q * GROUP_PAD); row = token * GROUP_PAD + head
    BLOCK_N: tl.constexpr,  # keys per iteration
    PAGE_SIZE: tl.constexpr,  # tokens per KV block
    NUM_SPLITS: tl.constexpr,
    IEEE_FP32: tl.constexpr,  # fp32 inputs: exact fp32 dots instead of tf32
    IS_FP8: tl.constexpr,  # fp8 caches: tiles converted to q's dtype before the dots
    SLIDING: tl.constexpr,  # a sliding-window layer: keys older than `window` are invisible
):
    seq = tl.program_id(0) + seq_offset
    q_tile = tl.program_id(1) // NUM_SPLITS
    split = tl.program_id(1) % NUM_SPLITS
    kv_head = tl.program_id(2)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len  # keys before this step's tokens

    rows = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + rows // GROUP_PAD  # query token index within the sequence
    head_in_group = rows % GROUP_PAD
    row_valid = (tok < q_len) & (head_in_group < GROUP)
    q_head = kv_head * GROUP + head_in_group
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM

    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_q_t + q_head[:, None] * stride_q_h + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    q_pos = ctx_len + tok  # absolute position of each row's token

    # Keys this tile can see: up to its last valid token's position (causal). Empty tiles see none.
    tile_first = q_tile * BLOCK_Q
    tile_last = tl.minimum(q_len, tile_first + BLOCK_Q) - 1
    kv_end = tl.where(tile_first < q_len, ctx_len + tile_last + 1, 0)
    # NOTE: no key before the first row's window start is loaded: its block may be freed (-1).
    win_lo = 0
    if SLIDING:
        win_lo = tl.maximum(ctx_len + tile_first - window + 1, 0)
    if NUM_SPLITS == 1:
        kv_lo = win_lo
        kv_hi = kv_end
    else:
        per_split = tl.cdiv(tl.cdiv(tl.maximum(kv_end - win_lo, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
        kv_lo = win_lo + split * per_split
        kv_hi = tl.minimum(kv_end, kv_lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    row_elems = NUM_KV_HEADS * HEAD_DIM

    for start in range(kv_lo, kv_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < kv_hi
        block_ids = tl.load(block_table_row + keys // PAGE_SIZE, mask=key_valid, other=0).to(tl.int64)
        key_offs = (block_ids * PAGE_SIZE + keys % PAGE_SIZE) * row_elems + kv_head * HEAD_DIM  # [BLOCK_N]
        kv_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_cache_ptr + key_offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [N, D]
        if IS_FP8:
            k = k.to(q.dtype)
        if IEEE_FP32:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * scale_log2
        visible = key_valid[None, :] & (keys[None, :] <= q_pos[:, None])
        if SLIDING:
            visible = visible & (keys[None, :] > q_pos[:, None] - window)
        qk = tl.where(visible, qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no visible key yet keeps m = -inf; shift it by 0 to avoid inf - inf.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(qk - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + key_offs[:, None] + dims[None, :], mask=kv_mask, other=0.0)  # [N, D]
        if IS_FP8:
            v = v.to(q.dtype)
        if IEEE_FP32:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if IS_FP8:
        acc = acc * v_scale

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_o_t + q_head[:, None] * stride_o_h + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
    else:
        part_row = (q_rows * (NUM_KV_HEADS * GROUP) + q_head) * NUM_SPLITS + split  # [BLOCK_M]
        tl.store(part_acc_ptr + part_row[:, None] * BLOCK_D + dims[None, :], acc, mask=row_valid[:, None])
        tl.store(part_max_ptr + part_row, m_i, mask=row_valid)
        tl.store(part_sum_ptr + part_row, l_i, mask=row_valid)


@triton.jit(do_not_specialize=["seq_offset"])
def _merge_splits_kernel(
    out_ptr,  # [T, Hq, D]
    part_acc_ptr,  # fp32 [T, Hq, NUM_SPLITS, BLOCK_D]
    part_max_ptr,  # fp32 [T, Hq, NUM_SPLITS]
    part_sum_ptr,  # fp32 [T, Hq, NUM_SPLITS]
    query_start_loc_ptr,  # int32 [B + 1]; decode rows, one token each
    stride_o_t,
    stride_o_h,
    seq_offset,  # program_id(0) + seq_offset = the sequence
    NUM_Q_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0) + seq_offset
    head = tl.program_id(1)
    token = tl.load(query_start_loc_ptr + seq)
    has_token = tl.load(query_start_loc_ptr + seq + 1) > token  # padding rows have no token
    splits = tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, BLOCK_D)
    part_row = (token.to(tl.int64) * NUM_Q_HEADS + head) * NUM_SPLITS + splits  # [S]
    m = tl.load(part_max_ptr + part_row, mask=has_token, other=float("-inf"))
    s = tl.load(part_sum_ptr + part_row, mask=has_token, other=0.0)
    acc = tl.load(part_acc_ptr + part_row[:, None] * BLOCK_D + dims[None, :], mask=has_token, other=0.0)
    m_all = tl.max(m, 0)
    # Empty partitions (m = -inf) weigh 0; an all-empty row (no keys) gives 0, never NaN.
    weight = tl.where(m == float("-inf"), 0.0, tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all)))
    denom = tl.sum(weight * s, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(
        out_ptr + token.to(tl.int64) * stride_o_t + head * stride_o_h + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=(dims < HEAD_DIM) & has_token,
    )


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: choose as an H100 would
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Partitions per decode row: enough programs to fill about two waves of the GPU, no partition
    under _MIN_KEYS_PER_SPLIT keys, at most the cap for max_seq_len (see LONG_ROW_KEYS). A power
    of two, so few kernel variants get compiled."""
    programs = max(1, num_seqs * num_kv_heads)
    wanted = cdiv(2 * _num_sms(device), programs)
    by_length = cdiv(max(1, max_seq_len), _MIN_KEYS_PER_SPLIT)
    cap = _MAX_LONG_SPLITS if max_seq_len >= LONG_ROW_KEYS else _MAX_SPLITS
    splits = max(1, min(wanted, by_length, cap))
    return 1 if splits == 1 else next_power_of_2(splits)


def paged_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    seq_lens: torch.Tensor,  # int32 [B]
    query_start_loc: torch.Tensor,  # int32 [B + 1]
    scale: float,
    *,
    max_query_len: int,
    max_seq_len: int,
    is_decode_only: bool = False,
    out: torch.Tensor | None = None,  # [T, Hq, D] like q; written in place when given
    k_scale: float = 1.0,  # fp8 caches: K = fp8 * k_scale
    v_scale: float = 1.0,
    num_decodes: int = 0,
    sliding_window: int | None = None,  # keys per query incl. itself (this layer's window); None: all
) -> torch.Tensor:  # [T, Hq, D]
    """Causal attention of each sequence's new tokens over its whole paged context.

    `max_query_len` / `max_seq_len` are host-side upper bounds of the batch's query and context
    lengths (for CUDA graphs: the bounds the graph was captured with). Decode batches
    (`is_decode_only` or `max_query_len == 1`) may take the split-KV path.

    num_decodes: the first `num_decodes` sequences have exactly one new token (the model runner
    puts decode rows first). In a mixed batch they then get decode tiles in a launch of their own:
    in prefill tiles a one-token row leaves most of its tile idle (a late W1 chunked-prefill step
    spent 41 ms in attention, 30 of them on its ~380 decode rows).

    sliding_window: a split-KV decode divides only the window (never more than it needs).
    """
    num_seqs = seq_lens.shape[0]
    decode = is_decode_only or max_query_len == 1
    if decode or not 0 < num_decodes < num_seqs:
        num_splits = 1
        if decode:
            num_splits = choose_num_splits(num_seqs, k_cache.shape[2], _keys_seen(max_seq_len, sliding_window),
                                           q.device)
        return paged_attention_with_splits(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
            max_query_len=1 if decode else max_query_len, num_splits=num_splits, out=out,
            k_scale=k_scale, v_scale=v_scale, sliding_window=sliding_window,
        )
    _check_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    check_kv_scales("paged_attention", k_cache, k_scale, v_scale)
    _check_window(sliding_window)
    out = check_out("paged_attention", "out", out, q)
    if q.shape[0] == 0:
        return out
    args = (q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, k_scale, v_scale,
            sliding_window)
    decode_splits = choose_num_splits(num_decodes, k_cache.shape[2], _keys_seen(max_seq_len, sliding_window), q.device)
    _launch(*args, max_query_len=1, num_splits=decode_splits, seq_start=0, seq_end=num_decodes)
    _launch(*args, max_query_len=max_query_len, num_splits=1, seq_start=num_decodes, seq_end=num_seqs)
    return out


def paged_attention_with_splits(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    num_splits: int,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    seqs: tuple[int, int] | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """`paged_attention` with the partition count chosen by the caller (tests and benchmarks).

    num_splits > 1 requires a decode batch (every sequence has at most one new token).
    seqs: (start, end) computes only those sequences' rows of `out` (default: all); the bounds
    then apply to them alone.
    """
    _check_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    check_kv_scales("paged_attention", k_cache, k_scale, v_scale)
    _check_window(sliding_window)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"paged_attention: num_splits must be a power of two >= 1, got {num_splits}")
    if num_splits > 1 and max_query_len != 1:
        raise ValueError("paged_attention: split-KV is for decode batches only (max_query_len == 1)")
    seq_start, seq_end = seqs if seqs is not None else (0, seq_lens.shape[0])
    if not 0 <= seq_start <= seq_end <= seq_lens.shape[0]:
        raise ValueError(f"paged_attention: seqs {seqs} out of range for {seq_lens.shape[0]} sequences")
    out = check_out("paged_attention", "out", out, q)
    if q.shape[0] == 0 or seq_end == seq_start:
        return out
    if max_query_len < 1:
        raise ValueError(f"paged_attention: max_query_len must be >= 1 for a non-empty batch, got {max_query_len}")
    _launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, k_scale, v_scale,
            sliding_window, max_query_len=max_query_len, num_splits=num_splits, seq_start=seq_start,
            seq_end=seq_end)
    return out


def paged_prefill_attention(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]
    seq_lens: torch.Tensor,  # int32 [B]
    query_start_loc: torch.Tensor,  # int32 [B + 1]
    scale: float,
    *,
    max_query_len: int,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    sliding_window: int | None = None,
    tile: dict[str, int] | None = None,  # kernels/prefill_attention.py TILE keys; default TILE
) -> torch.Tensor:  # [T, Hq, D]
    """The Hopper-shaped prefill kernel on its own (tests, the sweep): every sequence's rows, any
    chunk lengths (decode rows included, though they waste most of a 128-row tile)."""
    _check_attention_inputs(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    check_kv_scales("paged_attention", k_cache, k_scale, v_scale)
    _check_window(sliding_window)
    out = check_out("paged_attention", "out", out, q)
    if q.shape[0] == 0 or seq_lens.shape[0] == 0:
        return out
    if max_query_len < 1:
        raise ValueError(f"paged_attention: max_query_len must be >= 1 for a non-empty batch, got {max_query_len}")
    launch_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, k_scale, v_scale,
                   sliding_window, max_query_len=max_query_len, seq_start=0, seq_end=seq_lens.shape[0], tile=tile)
    return out


def _check_window(sliding_window: int | None) -> None:
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"paged_attention: sliding_window must be None or an int >= 1, got {sliding_window!r}")


def _keys_seen(max_seq_len: int, sliding_window: int | None) -> int:
    """The most keys one decode row attends to: its context, or its window."""
    return max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)


def _launch(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float, out: torch.Tensor,
    k_scale: float, v_scale: float, sliding_window: int | None, *, max_query_len: int, num_splits: int,
    seq_start: int, seq_end: int,
) -> None:
    """The kernel launch(es) for sequences [seq_start, seq_end), inputs already checked."""
    if max_query_len > 1 and LONG_PREFILL_MIN_QUERY_TOKENS is not None and max_query_len >= LONG_PREFILL_MIN_QUERY_TOKENS:
        launch_prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, out, k_scale, v_scale,
                       sliding_window, max_query_len=max_query_len, seq_start=seq_start, seq_end=seq_end)
        return
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = seq_end - seq_start
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    block_d = max(16, next_power_of_2(head_dim))
    group_pad = next_power_of_2(group)
    if max_query_len == 1:
        tile = DECODE_TILE_FP8 if is_fp8(k_cache) else DECODE_TILE
        block_q, block_n, num_warps, num_stages = 1, tile["block_n"], tile["num_warps"], tile["num_stages"]
    else:
        # Prefill tiles hold about PREFILL_TILE["rows"] (token, head) rows; a GQA group never
        # spans two programs.
        tile = PREFILL_TILE
        block_q = max(1, tile["rows"] // group_pad)
        block_n = tile["block_n"] if head_dim <= 128 else tile["block_n"] // 2
        num_warps, num_stages = tile["num_warps"], tile["num_stages"]
    block_m = max(16, block_q * group_pad)
    q_tiles = cdiv(max_query_len, block_q)

    if num_splits > 1:
        part_acc = torch.empty((num_tokens, num_q_heads, num_splits, block_d), dtype=torch.float32, device=q.device)
        part_max = torch.empty((num_tokens, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_acc = part_max = part_sum = out  # unused by the kernel when NUM_SPLITS == 1

    scale_log2 = float(scale) * float(k_scale) * 1.4426950408889634  # log2(e)
    _paged_attention_kernel[(num_seqs, q_tiles * num_splits, num_kv_heads)](
        out, part_acc, part_max, part_sum,
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale_log2, float(v_scale),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0), seq_start,
        sliding_window or 0,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE_SIZE=page_size, NUM_SPLITS=num_splits, IEEE_FP32=q.dtype == torch.float32, IS_FP8=is_fp8(k_cache),
        SLIDING=sliding_window is not None, num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_q_heads)](
            out, part_acc, part_max, part_sum, query_start_loc, out.stride(0), out.stride(1), seq_start,
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            num_warps=4,
        )


def check_q_and_caches(op: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """q [T, Hq, D] (dims packed) against caches [N, BS, Hkv, D] (contiguous): shapes, GQA, dtypes."""
    if q.dim() != 3:
        raise ValueError(f"{op}: q must be [T, Hq, D], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: caches must both be [N, BS, Hkv, D], got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    check_cache_dtypes(op, q, k_cache, v_cache)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"{op}: q head size {head_dim} != cache head size {k_cache.shape[3]}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{op}: {num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if q.stride(2) != 1:
        raise ValueError(f"{op}: q's last dim must be contiguous, got strides {q.stride()}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{op}: k_cache and v_cache must be contiguous")


def _check_attention_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
) -> None:
    op = "paged_attention"
    check_q_and_caches(op, q, k_cache, v_cache)
    num_seqs = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    for name, t, shape in (
        ("seq_lens", seq_lens, (num_seqs,)),
        ("query_start_loc", query_start_loc, (num_seqs + 1,)),
    ):
        if t.dtype != torch.int32 or tuple(t.shape) != shape or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous int32 {list(shape)}, got {t.dtype} "
                             f"{tuple(t.shape)}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != num_seqs:
        raise ValueError(f"{op}: block_tables must be int32 [{num_seqs}, max_blocks], got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if block_tables.stride(1) != 1:
        raise ValueError(f"{op}: block_tables rows must be contiguous, got strides {block_tables.stride()}")
    check_same_device(op, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
