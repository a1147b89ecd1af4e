"""Cascade attention for decode batches that share a prefix (torch reference:
kernels/reference.py `cascade_attention_ref`).

When every sequence of a decode batch starts with the same KV blocks (one prompt prefix, served
from the prefix cache, or n > 1 choices of one request), plain decode attention reads those blocks
once per sequence: at 256 sequences x 2,048 shared tokens that is ~2 GB of K/V per layer of an 8B
model, nearly all of it the same 8 MB read 256 times. Cascade attention splits each row's keys in
two at `prefix_len`:

1. the shared prefix, keys [0, prefix_len) read from `prefix_blocks`: a prefill-shaped kernel whose
   tiles hold many sequences x the GQA group of one kv head (row = seq * GROUP_PAD + head), so each
   K/V tile is loaded once per program for all of those queries and the QK^T / PV products are real
   matrix multiplies. No causal mask: every query is at or past the prefix's end. The prefix is cut
   into PREFIX_SPLITS partitions (split-KV) so a batch has enough programs to fill the GPU; each
   writes a partial in the split-KV format of kernels/attention.py (`_merge_splits_kernel`): fp32
   unnormalised output [B, Hq, S, BLOCK_D], running max [B, Hq, S] in log2 units, and sum.
2. each sequence's own suffix, keys [prefix_len, seq_len) from its block table, one program per
   (sequence, kv head) as the decode kernel; the program then merges the prefix partials into its
   own online-softmax state (by their maxima, in log2 units) and writes the normalised output. The
   merge lives in this kernel's epilogue, so a cascade layer is two launches.

Rows never see keys at or past their own `seq_len`, in both kernels: a prefix longer than some
row's context (a padding row of a CUDA graph, or a sequence whose new token lies in a shared
block) is still exact attention for that row. `prefix_len = 0` is plain decode. Rows may share
less than the whole prefix (`row_prefix_lens`, 0 for a row that shares none: most of a batch
sharing one prompt, a few holding their own copies of it): each row splits at its own length.

NOTE (CUDA graphs): `prefix_len` is a device int32 and the prefix's block ids a device buffer; the
grid depends only on the batch size, the heads and the host bound `max_prefix_len` (which picks
PREFIX_SPLITS), so one captured graph replays with any prefix length up to that bound.

Sliding-window layers are not handled here (the layer uses plain decode for them). FP8 caches are:
tiles are converted to q's dtype before the dots, k_scale folded into the softmax scale, v_scale
applied to each partial output (as kernels/attention.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from appliance_kernels.attention import _num_sms, check_q_and_caches
from appliance_kernels.checks import check_out, check_same_device
from appliance_kernels.fp8 import check_kv_scales, is_fp8
from appliance_kernels.intmath import cdiv, next_power_of_2

# Prefix tile: rows = sequences x GQA heads of one kv head per program (so 32 sequences of
# Llama-3-8B's group of 4), keys per iteration, warps, stages. A starting guess for an H100/H200
# at head_dim 128; bench/cascade.py --sweep times the candidates in PREFIX_TILES.
PREFIX_TILE = {"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 2}
# fp32 inputs and head_dim > 128 (Gemma 3's 256): half the rows and keys, so the operand tiles
# and the fp32 accumulator fit in shared memory and registers (as the prefill tiles halve block_n).
PREFIX_TILE_WIDE = {"rows": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
PREFIX_TILES = [
    {"rows": 128, "block_n": 64, "num_warps": 8, "num_stages": 2},
    {"rows": 128, "block_n": 64, "num_warps": 4, "num_stages": 2},
    {"rows": 128, "block_n": 32, "num_warps": 4, "num_stages": 3},
    {"rows": 64, "block_n": 64, "num_warps": 4, "num_stages": 2},
    {"rows": 256, "block_n": 32, "num_warps": 8, "num_stages": 2},
]
# Suffix (per-sequence) tile, as the decode kernel's (kernels/attention.py DECODE_TILE).
SUFFIX_TILE = {"block_n": 64, "num_warps": 4, "num_stages": 2}
SUFFIX_TILE_FP8 = {"block_n": 128, "num_warps": 4, "num_stages": 2}
# Prefix partitions: never fewer than this many keys each, never more partitions than this.
_MIN_PREFIX_KEYS_PER_SPLIT = 256
_MAX_PREFIX_SPLITS = 16


@triton.jit
def _softmax_tile(acc, l_i, m_i, q, k, v, visible, scale_log2, IEEE_FP32: tl.constexpr, IS_FP8: tl.constexpr):
    """One key tile of an online softmax (base 2): scores q k^T, invisible keys -inf, then the
    running max/sum/output updated. Rows that have seen no visible key keep m = -inf."""
    if IS_FP8:
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    if IEEE_FP32:
        qk = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(k))
    qk = tl.where(visible, qk * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # never -inf - -inf
    p = tl.exp2(qk - m_shift[:, None])
    alpha = tl.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE_FP32:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _load_kv_tile(k_cache_ptr, v_cache_ptr, block_ids_ptr, keys, key_valid, kv_head, dims, dim_valid,
                  NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """K and V rows [BLOCK_N, BLOCK_D] of `keys` through a block table (invalid keys: zeros)."""
    block_ids = tl.load(block_ids_ptr + keys // PAGE_SIZE, mask=key_valid, other=0).to(tl.int64)
    offs = (block_ids * PAGE_SIZE + keys % PAGE_SIZE) * (NUM_KV_HEADS * HEAD_DIM) + kv_head * HEAD_DIM
    mask = key_valid[:, None] & dim_valid[None, :]
    k = tl.load(k_cache_ptr + offs[:, None] + dims[None, :], mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + offs[:, None] + dims[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit(do_not_specialize=["num_seqs", "stride_rp"])
def _cascade_prefix_kernel(
    part_acc_ptr,  # fp32 [B, Hq, PREFIX_SPLITS, BLOCK_D]
    part_max_ptr,  # fp32 [B, Hq, PREFIX_SPLITS], log2 units
    part_sum_ptr,  # fp32 [B, Hq, PREFIX_SPLITS]
    q_ptr,  # [B, Hq, D], dims packed; row b is sequence b's one new token
    k_cache_ptr,  # [N, BS, Hkv, D] contiguous
    v_cache_ptr,
    prefix_blocks_ptr,  # int32 [>= cdiv(prefix_len, BS)]
    prefix_len_ptr,  # int32 [1]
    row_prefix_lens_ptr,  # int32 [B] (stride_rp 1), or prefix_len_ptr (stride_rp 0: every row shares it all)
    seq_lens_ptr,  # int32 [B]
    num_seqs,
    stride_rp,
    scale_log2,
    v_scale,
    stride_q_t,
    stride_q_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    SEQS_PER_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr,  # SEQS_PER_TILE * GROUP_PAD
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PREFIX_SPLITS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    seq_tile = tl.program_id(0)
    split = tl.program_id(1)
    kv_head = tl.program_id(2)

    rows = tl.arange(0, BLOCK_M)
    seq = seq_tile * SEQS_PER_TILE + rows // GROUP_PAD
    head_in_group = rows % GROUP_PAD
    row_valid = (seq < num_seqs) & (head_in_group < GROUP)
    q_head = kv_head * GROUP + head_in_group
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    seq64 = seq.to(tl.int64)
    q = tl.load(q_ptr + seq64[:, None] * stride_q_t + q_head[:, None] * stride_q_h + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    # A row sees the prefix keys below its own share of the prefix and below its context length
    # (its new token is at seq_len - 1).
    row_end = tl.minimum(tl.load(seq_lens_ptr + seq, mask=row_valid, other=0),
                         tl.load(row_prefix_lens_ptr + seq * stride_rp, mask=row_valid, other=0))

    prefix_len = tl.load(prefix_len_ptr)
    per_split = tl.cdiv(tl.cdiv(prefix_len, PREFIX_SPLITS), BLOCK_N) * BLOCK_N
    kv_lo = split * per_split
    kv_hi = tl.minimum(prefix_len, kv_lo + per_split)
    row_end = tl.minimum(row_end, kv_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(kv_lo, kv_hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, prefix_blocks_ptr, keys, keys < kv_hi, kv_head, dims,
                             dim_valid, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE)
        visible = keys[None, :] < row_end[:, None]
        acc, l_i, m_i = _softmax_tile(acc, l_i, m_i, q, k, v, visible, scale_log2, IEEE_FP32, IS_FP8)
    if IS_FP8:
        acc = acc * v_scale

    part_row = (seq64 * (NUM_KV_HEADS * GROUP) + q_head) * PREFIX_SPLITS + split
    tl.store(part_acc_ptr + part_row[:, None] * BLOCK_D + dims[None, :], acc, mask=row_valid[:, None])
    tl.store(part_max_ptr + part_row, m_i, mask=row_valid)
    tl.store(part_sum_ptr + part_row, l_i, mask=row_valid)


@triton.jit(do_not_specialize=["stride_bt", "stride_rp"])
def _cascade_suffix_merge_kernel(
    out_ptr,  # [B, Hq, D]
    part_acc_ptr,  # the prefix kernel's partials
    part_max_ptr,
    part_sum_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,  # int32 [B, max_blocks]
    seq_lens_ptr,  # int32 [B]
    row_prefix_lens_ptr,  # as the prefix kernel's
    scale_log2,
    v_scale,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_bt,
    stride_rp,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # max(16, GROUP rounded up to a power of two)
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PREFIX_SPLITS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq64 = seq.to(tl.int64)

    head_in_group = tl.arange(0, BLOCK_M)
    row_valid = head_in_group < GROUP
    q_head = kv_head * GROUP + head_in_group
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q = tl.load(q_ptr + seq64 * stride_q_t + q_head[:, None] * stride_q_h + dims[None, :],
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    seq_len = tl.load(seq_lens_ptr + seq)
    kv_lo = tl.minimum(tl.load(row_prefix_lens_ptr + seq * stride_rp), seq_len)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(kv_lo, seq_len, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < seq_len
        k, v = _load_kv_tile(k_cache_ptr, v_cache_ptr, block_tables_ptr + seq64 * stride_bt, keys, key_valid,
                             kv_head, dims, dim_valid, NUM_KV_HEADS, HEAD_DIM, PAGE_SIZE)
        acc, l_i, m_i = _softmax_tile(acc, l_i, m_i, q, k, v, key_valid[None, :], scale_log2, IEEE_FP32, IS_FP8)
    if IS_FP8:
        acc = acc * v_scale

    # Merge the prefix's partials (empty ones: m = -inf, weight 0).
    part_row = (seq64 * (NUM_KV_HEADS * GROUP) + q_head) * PREFIX_SPLITS
    for s in tl.static_range(PREFIX_SPLITS):
        m_p = tl.load(part_max_ptr + part_row + s, mask=row_valid, other=float("-inf"))
        l_p = tl.load(part_sum_ptr + part_row + s, mask=row_valid, other=0.0)
        acc_p = tl.load(part_acc_ptr + (part_row + s)[:, None] * BLOCK_D + dims[None, :], mask=row_valid[:, None],
                        other=0.0)
        m_new = tl.maximum(m_i, m_p)
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        beta = tl.exp2(m_p - m_shift)
        acc = acc * alpha[:, None] + acc_p * beta[:, None]
        l_i = l_i * alpha + l_p * beta
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + seq64 * stride_o_t + q_head[:, None] * stride_o_h + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & dim_valid[None, :])


def choose_prefix_splits(num_seqs: int, num_kv_heads: int, group: int, max_prefix_len: int,
                         device: torch.device, rows: int = PREFIX_TILE["rows"]) -> int:
    """Prefix partitions: enough programs for about two waves of the GPU, none under
    _MIN_PREFIX_KEYS_PER_SPLIT keys of `max_prefix_len`; a power of two (few kernel variants)."""
    group_pad = next_power_of_2(group)
    seq_tiles = cdiv(max(1, num_seqs), max(16, rows, group_pad) // group_pad)
    wanted = cdiv(2 * _num_sms(device), seq_tiles * num_kv_heads)
    by_length = cdiv(max(1, max_prefix_len), _MIN_PREFIX_KEYS_PER_SPLIT)
    splits = max(1, min(wanted, by_length, _MAX_PREFIX_SPLITS))
    return next_power_of_2(splits)


def cascade_attention(
    q: torch.Tensor,  # [B, Hq, D]: one new token per sequence (a decode batch)
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]
    block_tables: torch.Tensor,  # int32 [B, max_blocks]; each row starts with the prefix's blocks
    seq_lens: torch.Tensor,  # int32 [B]; context length including the new token
    prefix_blocks: torch.Tensor,  # int32 [P]: the shared prefix's block ids (P blocks cover max_prefix_len)
    prefix_len: torch.Tensor,  # int32 [1] (device): shared tokens, <= P * BS
    scale: float,
    *,
    row_prefix_lens: torch.Tensor | None = None,  # int32 [B]: row b shares the first of them (<= prefix_len)
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    max_prefix_len: int | None = None,  # host bound on prefix_len; default P * BS
    prefix_splits: int | None = None,  # default choose_prefix_splits
    prefix_tile: dict[str, int] | None = None,  # PREFIX_TILE keys (benchmarks)
) -> torch.Tensor:  # [B, Hq, D]
    """Decode attention of B sequences whose first `prefix_len` keys are the blocks
    `prefix_blocks` (the same in every table): the prefix attended once for all queries, each
    suffix alone, merged by log-sum-exp. Equals `paged_attention` of the same decode batch.

    row_prefix_lens: rows that share less (row b's first row_prefix_lens[b] keys are the prefix's,
    0 for a row that shares none: its whole context is its suffix); None: every row shares
    prefix_len keys."""
    op = "cascade_attention"
    check_q_and_caches(op, q, k_cache, v_cache)
    check_kv_scales(op, k_cache, k_scale, v_scale)
    num_seqs, num_q_heads, head_dim = q.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if seq_lens.dtype != torch.int32 or tuple(seq_lens.shape) != (num_seqs,) or not seq_lens.is_contiguous():
        raise ValueError(f"{op}: seq_lens must be a contiguous int32 [{num_seqs}] (one per row of q), got "
                         f"{seq_lens.dtype} {tuple(seq_lens.shape)}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != num_seqs \
            or block_tables.stride(1) != 1:
        raise ValueError(f"{op}: block_tables must be int32 [{num_seqs}, max_blocks] with contiguous rows, got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)}")
    if prefix_blocks.dtype != torch.int32 or prefix_blocks.dim() != 1 or not prefix_blocks.is_contiguous():
        raise ValueError(f"{op}: prefix_blocks must be a contiguous int32 [P], got {prefix_blocks.dtype} "
                         f"{tuple(prefix_blocks.shape)}")
    if prefix_len.dtype != torch.int32 or prefix_len.numel() != 1:
        raise ValueError(f"{op}: prefix_len must be a one-element int32 tensor, got {prefix_len.dtype} "
                         f"{tuple(prefix_len.shape)}")
    capacity = prefix_blocks.shape[0] * page_size
    if max_prefix_len is None:
        max_prefix_len = capacity
    if not 0 <= max_prefix_len <= capacity:
        raise ValueError(f"{op}: max_prefix_len {max_prefix_len} is beyond what {prefix_blocks.shape[0]} prefix "
                         f"blocks of {page_size} tokens hold")
    if row_prefix_lens is None:
        row_prefix_lens, stride_rp = prefix_len, 0
    elif row_prefix_lens.dtype != torch.int32 or tuple(row_prefix_lens.shape) != (num_seqs,) \
            or not row_prefix_lens.is_contiguous():
        raise ValueError(f"{op}: row_prefix_lens must be a contiguous int32 [{num_seqs}], got "
                         f"{row_prefix_lens.dtype} {tuple(row_prefix_lens.shape)}")
    else:
        stride_rp = 1
    check_same_device(op, q, k_cache, v_cache, block_tables, seq_lens, prefix_blocks, prefix_len, row_prefix_lens)
    out = check_out(op, "out", out, q)
    if num_seqs == 0:
        return out

    group = num_q_heads // num_kv_heads
    group_pad = next_power_of_2(group)
    block_d = max(16, next_power_of_2(head_dim))
    tile = prefix_tile or (PREFIX_TILE_WIDE if q.dtype == torch.float32 or head_dim > 128 else PREFIX_TILE)
    block_m = max(16, tile["rows"], group_pad)
    seqs_per_tile = block_m // group_pad  # a GQA group never spans two tiles
    if prefix_splits is None:
        prefix_splits = choose_prefix_splits(num_seqs, num_kv_heads, group, max_prefix_len, q.device, tile["rows"])
    if prefix_splits < 1 or prefix_splits & (prefix_splits - 1):
        raise ValueError(f"{op}: prefix_splits must be a power of two >= 1, got {prefix_splits}")
    fp8 = is_fp8(k_cache)
    ieee = q.dtype == torch.float32
    scale_log2 = float(scale) * float(k_scale) * 1.4426950408889634  # log2(e)

    part_acc = torch.empty((num_seqs, num_q_heads, prefix_splits, block_d), dtype=torch.float32, device=q.device)
    part_max = torch.empty((num_seqs, num_q_heads, prefix_splits), dtype=torch.float32, device=q.device)
    part_sum = torch.empty_like(part_max)
    _cascade_prefix_kernel[(cdiv(num_seqs, seqs_per_tile), prefix_splits, num_kv_heads)](
        part_acc, part_max, part_sum, q, k_cache, v_cache, prefix_blocks, prefix_len, row_prefix_lens, seq_lens,
        num_seqs, stride_rp, scale_log2, float(v_scale), q.stride(0), q.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, GROUP_PAD=group_pad,
        SEQS_PER_TILE=seqs_per_tile, BLOCK_M=block_m, BLOCK_N=tile["block_n"], PAGE_SIZE=page_size,
        PREFIX_SPLITS=prefix_splits, IEEE_FP32=ieee, IS_FP8=fp8,
        num_warps=tile["num_warps"], num_stages=tile["num_stages"],
    )
    suffix = SUFFIX_TILE_FP8 if fp8 else SUFFIX_TILE
    _cascade_suffix_merge_kernel[(num_seqs, num_kv_heads)](
        out, part_acc, part_max, part_sum, q, k_cache, v_cache, block_tables, seq_lens, row_prefix_lens,
        scale_log2, float(v_scale), q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        stride_rp,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group, BLOCK_M=max(16, group_pad),
        BLOCK_N=suffix["block_n"], PAGE_SIZE=page_size, PREFIX_SPLITS=prefix_splits, IEEE_FP32=ieee,
        IS_FP8=fp8, num_warps=suffix["num_warps"], num_stages=suffix["num_stages"],
    )
    return out
