"""Rotary embedding fused with the KV-cache write (torch reference: kernels/reference.py
`rotary_store_kv_ref`).

Two programs per token, each reading the token's cos/sin row: one rotates every query head into
`q_out`, the other writes the rotated key heads and the (unrotated) value heads straight into the
paged cache at the token's slot (slot -1: a padding token, nothing stored). Rotated k never goes back to memory
as its own tensor: one launch and one k round trip less per layer than rotary + store_kv.

Rotated k is rounded to k's dtype before it goes into the cache (and, for an fp8 cache, is then
divided by k_scale and saturated), so the cache holds exactly what rotary_ref + store_kv_ref write.

NOTE: no host sync and no host reads of device values: the decode CUDA graphs capture this launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from appliance_kernels.attention import check_cache_dtypes
from appliance_kernels.checks import check_out, check_same_device
from appliance_kernels.fp8 import check_kv_scales, is_fp8, to_cache
from appliance_kernels.intmath import next_power_of_2
from appliance_kernels.rotary import _cos_sin_row, _rotate_heads


@triton.jit
def _rotary_store_kv_kernel(
    q_out_ptr,  # [T, Hq, D] contiguous
    k_cache_ptr,  # [N, BS, Hkv, D] contiguous
    v_cache_ptr,  # [N, BS, Hkv, D] contiguous
    q_ptr,  # [T, Hq, D], dims packed
    k_ptr,  # [T, Hkv, D], dims packed
    v_ptr,  # [T, Hkv, D], dims packed
    positions_ptr,  # int32/int64 [T]
    slot_mapping_ptr,  # int32/int64 [T]; -1 = padding token, not stored
    cos_sin_ptr,  # fp32 [max_pos, D] = cat(cos[:, :D/2], sin[:, :D/2]), contiguous
    k_scale,  # fp8 caches: stored = x / scale
    v_scale,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    half: tl.constexpr = HEAD_DIM // 2
    cos, sin = _cos_sin_row(positions_ptr, cos_sin_ptr, token, HEAD_DIM, HALF_PAD)
    if tl.program_id(1) == 0:  # the query heads; the keys and values in a second program
        _rotate_heads(q_out_ptr + token * NUM_Q_HEADS * HEAD_DIM, q_ptr + token * stride_q_t, stride_q_h,
                      HEAD_DIM, cos, sin, NUM_Q_HEADS, Q_HEADS_PAD, half, HALF_PAD)
    else:
        # A padding token (slot -1) stores nothing: fold it into the masks instead of branching.
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        row = tl.maximum(slot, 0) * (NUM_KV_HEADS * HEAD_DIM)
        heads = tl.arange(0, KV_HEADS_PAD)
        cols = tl.arange(0, HALF_PAD)
        store = (heads[:, None] < NUM_KV_HEADS) & (slot >= 0)
        half_mask = store & (cols[None, :] < half)
        k_src = k_ptr + token * stride_k_t + heads[:, None] * stride_k_h + cols[None, :]
        x1 = tl.load(k_src, mask=half_mask, other=0.0).to(tl.float32)
        x2 = tl.load(k_src + half, mask=half_mask, other=0.0).to(tl.float32)
        k_ty = k_ptr.dtype.element_ty
        r1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(k_ty)
        r2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(k_ty)
        k_dst = k_cache_ptr + row + heads[:, None] * HEAD_DIM + cols[None, :]
        cache_ty = k_cache_ptr.dtype.element_ty
        tl.store(k_dst, to_cache(r1, k_scale, IS_FP8).to(cache_ty), mask=half_mask)
        tl.store(k_dst + half, to_cache(r2, k_scale, IS_FP8).to(cache_ty), mask=half_mask)

        dims = tl.arange(0, DIM_PAD)
        v_mask = store & (dims[None, :] < HEAD_DIM)
        v = tl.load(v_ptr + token * stride_v_t + heads[:, None] * stride_v_h + dims[None, :], mask=v_mask, other=0.0)
        tl.store(v_cache_ptr + row + heads[:, None] * HEAD_DIM + dims[None, :],
                 to_cache(v, v_scale, IS_FP8).to(v_cache_ptr.dtype.element_ty), mask=v_mask)


def rotary_store_kv(
    positions: torch.Tensor,  # int32/int64 [T]
    q: torch.Tensor,  # [T, Hq, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [N, BS, Hkv, D]; q's dtype or float8_e4m3fn
    v_cache: torch.Tensor,  # [N, BS, Hkv, D]; like k_cache
    slot_mapping: torch.Tensor,  # int32/int64 [T]; -1 marks a padding token that is not stored
    cos_sin_cache: torch.Tensor,  # fp32 [max_pos, D] = cat(cos[:, :D/2], sin[:, :D/2])
    *,
    k_scale: float = 1.0,  # fp8 caches only: stored = clamp(x / scale, ±448)
    v_scale: float = 1.0,
    q_out: torch.Tensor | None = None,  # [T, Hq, D] contiguous; may be q itself (in place)
) -> torch.Tensor:  # rotated q [T, Hq, D]
    """Rotate q (returned) and k (into the cache), and store v, in one launch; caches in place."""
    op = "rotary_store_kv"
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"{op}: q must be [T, Hq, D] and k, v [T, Hkv, D], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"{op}: head size must be even, got {head_dim}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    check_cache_dtypes(op, q, k_cache, v_cache)
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(f"{op}: caches must both be [N, BS, {num_kv_heads}, {head_dim}], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (num_tokens,) or t.dtype not in (torch.int32, torch.int64) or not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be a contiguous int32/int64 [{num_tokens}], got {t.dtype} "
                             f"{tuple(t.shape)}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != head_dim or not cos_sin_cache.is_contiguous():
        raise ValueError(f"{op}: cos_sin_cache must be a contiguous [max_pos, {head_dim}], got "
                         f"{tuple(cos_sin_cache.shape)}")
    if q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1:
        raise ValueError(f"{op}: q, k and v need a contiguous last dim (strides {q.stride()}, {k.stride()}, "
                         f"{v.stride()})")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"{op}: k_cache and v_cache must be contiguous")
    check_kv_scales(op, k_cache, k_scale, v_scale)
    check_same_device(op, q, k, v, k_cache, v_cache, positions, slot_mapping, cos_sin_cache)
    q_out = check_out(op, "q_out", q_out, q)
    if num_tokens == 0:
        return q_out
    # Two programs per token: at one token per step (batch-1 decode) the query heads and the K/V
    # writes run side by side instead of one after the other.
    _rotary_store_kv_kernel[(num_tokens, 2)](
        q_out, k_cache, v_cache, q, k, v, positions, slot_mapping, cos_sin_cache, float(k_scale), float(v_scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads,
        Q_HEADS_PAD=next_power_of_2(num_q_heads), KV_HEADS_PAD=next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HALF_PAD=next_power_of_2(head_dim // 2),
        DIM_PAD=next_power_of_2(head_dim), IS_FP8=is_fp8(k_cache), num_warps=4,
    )
    return q_out
